#!/usr/bin/env bash
# The device job for the fast path (issue 6): CUDA-graph equality tests, the step-cost breakdown and the benchmark at
# batch 1, 4 and 16 (one H200, transformers 5.17, torch 2.11, no network). Ran through this workplace's device tool:
# the GGUF (98 MB) travels in three parts of 33 MB (the working tree plus what a call carries must stay under 64 MiB):
# calls 1 and 2 carry parts aa and ab and copy them to /root/stage; this job (call 3) carries part ac. Results go under $OUT.
# Elsewhere, run the three python commands below directly.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BLOCKPILOT_CACHE=/tmp/bpcache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/gg && cat /root/stage/gguf.part.aa /root/stage/gguf.part.ab .stage/gguf.part.ac > /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf   # a1231443440b107ff29f02bdb38c9d0a
python3 -c "from blockpilot_hf.default_model import default_target_path as p; print(p('/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
H=.stage/humaneval.jsonl
# 1. graphs == eager == plain generate, fp32, batch 1 and 4 (plus the CPU batching suite, on this machine's torch)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_batching.py > $OUT/pytest_cuda.log 2>&1
tail -3 $OUT/pytest_cuda.log
# 2. where the time goes: one draft / verify / plain step, per batch and block size, with and without the copy chain,
# graphs replayed; the table is named after this GPU (`hardware.machine_of`), as results/current/step_costs_by_machine/
mkdir -p $OUT/step_costs_by_machine
timeout 150 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --block-sizes 2,3,4,6,8,16 --batch-sizes 1,4,16 \
  --copy-tokens 5 --step-costs $OUT/step_costs_by_machine > $OUT/step_costs.log 2>&1
tail -5 $OUT/step_costs.log
# 2b. the shipped policy with this GPU's table beside its CPU ones (what it predicts does not depend on the machine)
timeout 40 python3 - "$OUT" > $OUT/policy_gpu.log 2>&1 <<'PY'
import sys
from pathlib import Path
from blockpilot_hf import BlockPolicy
from blockpilot_hf.default_model import DEFAULT_POLICY_PATH
from blockpilot_hf.training.policy import load_step_costs, step_costs_machine
out = Path(sys.argv[1])
path = str(next((out / "step_costs_by_machine").glob("*.json")))
policy = BlockPolicy.from_pretrained(DEFAULT_POLICY_PATH)
policy.set_step_costs(load_step_costs(path), machine=step_costs_machine(path))
policy.save_pretrained(out / "policy_gpu")
print("policy with", step_costs_machine(path), "->", out / "policy_gpu")
PY
tail -3 $OUT/policy_gpu.log
POLICY=$([ -f $OUT/policy_gpu/model.safetensors ] && echo "--policy $OUT/policy_gpu")
# 3. side by side on HumanEval, greedy, 256 new tokens
timeout 130 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --prompts $H --limit ${B1_LIMIT:-6} \
  --max-new-tokens 256 --methods plain,plain_static,fixed,fixed_copy,policy --copy-tokens 5 --block-sizes 4,8,16 --batch-sizes 1 $POLICY \
  --out $OUT/bench_h200 > $OUT/bench_b1.log 2>&1
tail -12 $OUT/bench_b1.log
timeout 130 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --prompts $H --limit ${B16_LIMIT:-32} \
  --max-new-tokens 256 --methods plain,plain_static,fixed,fixed_copy,policy --copy-tokens 5 --block-sizes 4,16 --batch-sizes 4,16 $POLICY \
  --out $OUT/bench_h200 > $OUT/bench_b16.log 2>&1
tail -24 $OUT/bench_b16.log
ls -la $OUT $OUT/bench_h200 2>/dev/null
