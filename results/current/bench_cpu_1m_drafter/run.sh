#!/usr/bin/env bash
# The headline bench of the 1M-token drafter and its policy (issue 16, item 6) and the copy chain beside it (issue
# 17): every method interleaved per prompt, one run per batch size and decoding mode, on this machine's 2 cores.
#   bash results/current/bench_cpu_1m_drafter/run.sh   (from the repository root; ~1 hour on a 2-core Xeon)
# A run whose results JSON exists is skipped, so a killed script resumes with the next run.
set -euo pipefail
source examples/jemalloc.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=results/current/bench_cpu_1m_drafter
bench() {  # TAG, then bench options
  local tag=$1
  shift
  if compgen -G "$OUT/results_${tag}*.json" > /dev/null; then echo "$tag: measured before"; return; fi
  .venv/bin/blockpilot bench --target default --prompts humaneval --copy-tokens 5 --out "$OUT" --tag "$tag" "$@"
}
for temperature in 0 1; do
  sizes=1,2,3,4
  if [ $temperature = 1 ]; then sizes=1,2,4; fi
  bench "b1_t$temperature" --limit 8 --max-new-tokens 128 --temperature $temperature --batch-sizes 1 \
    --methods plain,plain_packed,fixed,fixed_copy,policy,prompt_lookup --block-sizes $sizes
  bench "b4_t$temperature" --limit 8 --max-new-tokens 128 --temperature $temperature --batch-sizes 4 \
    --methods plain,plain_packed,fixed,fixed_copy,policy --block-sizes 1,2,4
  bench "b16_t$temperature" --limit 16 --max-new-tokens 128 --temperature $temperature --batch-sizes 16 \
    --methods plain,plain_packed,fixed,policy --block-sizes 1,2
done
