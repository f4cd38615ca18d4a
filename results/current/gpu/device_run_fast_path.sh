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
# 2. where the time goes: one draft / verify / plain step, per batch and block size, graphs replayed
timeout 120 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --block-sizes 2,3,4,6,8,16 --batch-sizes 1,4,16 \
  --step-costs $OUT/step_costs_h200.json > $OUT/step_costs.log 2>&1
tail -5 $OUT/step_costs.log
# 2b. the policy for this GPU: the committed labels (tau per size, hardware-independent) with this GPU's step costs
# (sizes only: the step costs above are timed without the copy chain)
timeout 40 python3 -m blockpilot_hf.cli train-policy --labels results/current/labels/policy_prompts_b1-16_copy5.jsonl \
  --eval-labels results/current/labels/humaneval_b1-16_copy5.jsonl --copy-tokens 0 --objective throughput \
  --cost-file $OUT/step_costs_h200.json --output-dir $OUT/policy_h200 > $OUT/policy_h200.log 2>&1
tail -3 $OUT/policy_h200.log
POLICY=$([ -f $OUT/policy_h200/model.safetensors ] && echo "--policy $OUT/policy_h200")
# 3. side by side on HumanEval, greedy, 256 new tokens
timeout 130 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --prompts $H --limit ${B1_LIMIT:-6} \
  --max-new-tokens 256 --methods plain,plain_static,fixed,policy --block-sizes 4,8,16 --batch-sizes 1 $POLICY \
  --out $OUT/bench_h200 > $OUT/bench_b1.log 2>&1
tail -12 $OUT/bench_b1.log
timeout 130 python3 -m blockpilot_hf.cli bench --target default --dtype bf16 --prompts $H --limit ${B16_LIMIT:-32} \
  --max-new-tokens 256 --methods plain,plain_static,fixed,policy --block-sizes 4,16 --batch-sizes 4,16 $POLICY \
  --out $OUT/bench_h200 > $OUT/bench_b16.log 2>&1
tail -24 $OUT/bench_b16.log
ls -la $OUT $OUT/bench_h200 2>/dev/null
