#!/usr/bin/env bash
# The benchmark on every GPU of the machine: prompts are split across processes, results gathered and written once.
#   bash examples/multi_gpu_bench.sh            # all HumanEval problems, greedy
#   LIMIT=20 TEMPERATURE=1.0 bash examples/multi_gpu_bench.sh
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
accelerate launch --num_processes "$NUM_PROCESSES" -m blockpilot_hf.cli bench \
  --target "${TARGET:-default}" --dtype "${DTYPE:-bf16}" --prompts "${PROMPTS:-humaneval}" \
  ${LIMIT:+--limit "$LIMIT"} --temperature "${TEMPERATURE:-0}" --max-new-tokens "${MAX_NEW_TOKENS:-256}" \
  --methods "${METHODS:-plain,prompt_lookup,native_dflash,fixed,policy}" --block-sizes "${BLOCK_SIZES:-4,8,12,14,15,16,17,18,20}" \
  ${DRAFTER:+--drafter "$DRAFTER"} ${POLICY:+--policy "$POLICY"} --out "${OUT:-results/bench_gpu}"
