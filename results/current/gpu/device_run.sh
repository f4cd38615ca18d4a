#!/usr/bin/env bash
# The device job that trained the shipped drafters and measured GPU speed (one H200, transformers 5.17, torch 2.11).
# It ran through this workplace's device tool: the GGUF (98 MB) travels in two parts, the first staged in
# /root/stage by an earlier call; results go under $OUT. Elsewhere, run examples/train_default_drafter.sh directly.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BLOCKPILOT_CACHE=/tmp/bpcache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/gg && cat /root/stage/gguf.part.aa .stage/gguf.part.ab > /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf   # a1231443440b107ff29f02bdb38c9d0a
python3 -c "from blockpilot_hf.default_model import default_target_path as p; print(p('/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
RUN=/tmp/run; mkdir -p $RUN
pack() {  # bf16 copies of the drafters + logs + data, split to fit the 16 MiB-per-file return limit
  python3 - <<'PY'
import glob, torch
from blockpilot_hf import DFlashDrafter
for d in sorted(glob.glob("/tmp/run/drafter-L*")):
    try:
        m = DFlashDrafter.from_pretrained(d)
    except Exception as e:
        print("skip", d, e); continue
    m.to(torch.bfloat16).save_pretrained(d.replace("/run/", "/pack/"))
PY
  for f in $RUN/drafter-L*/training_log.json; do cp $f /tmp/pack/$(basename $(dirname $f)).training_log.json; done
  gzip -c $RUN/responses.jsonl > /tmp/pack/responses.jsonl.gz 2>/dev/null
  cp $OUT/*.log /tmp/pack/ 2>/dev/null
  rm -f $OUT/pack.tgz.part.*; tar -C /tmp/pack -czf /tmp/pack.tgz . && split -b 15000000 /tmp/pack.tgz $OUT/pack.tgz.part.
  ls -la $OUT
}
mkdir -p /tmp/pack
OUT_DIR=$OUT
export -f pack; export RUN OUT_DIR
OUT=$RUN PROMPTS=.stage/prompts_drafter.jsonl NUM_PROMPTS=${NUM_PROMPTS:-3000} GEN_BATCH=512 GEN_BUDGET=${GEN_BUDGET:-120} \
  TRAIN_BUDGET=${TRAIN_BUDGET:-140} EPOCHS=6 BATCH=32 LAYERS="2 4" DTYPE=bf16 AFTER_EACH="OUT=$OUT_DIR pack" \
  bash examples/train_default_drafter.sh > $OUT_DIR/train.log 2>&1
tr '\r' '\n' < $OUT_DIR/train.log | grep -v "it/s\]\|Warn" | tail -30
OUT=$OUT_DIR
python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --prompts .stage/humaneval.jsonl --limit ${BENCH_LIMIT:-4} --max-new-tokens ${BENCH_TOKENS:-256} \
  --methods plain,fixed --block-sizes 8,16 --drafter $RUN/drafter-L2 --out /tmp/pack/bench_gpu > $OUT/bench.log 2>&1
tail -12 $OUT/bench.log
pack
