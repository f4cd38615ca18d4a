#!/usr/bin/env bash
# The shipped drafter and policy on the current loop (MeasuredLinear, Gumbel-max sampling, overlapping copies)
# against plain decoding in both product forms: every method interleaved per prompt, one run per batch size and
# decoding mode, on this machine's 2 cores. The greedy batch-1 run comes first (the headline's row).
#   bash results/current/bench_cpu_2m_drafter/run.sh   (from the repository root; 3-10 minutes a run on a 2-core Xeon)
# A run whose results JSON exists is skipped, so a killed script resumes with the next run.
set -euo pipefail
source examples/jemalloc.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=$(dirname "$0")
# One run per line: name, problems, batch size, methods, block sizes; each greedy first, then at T = 1.
RUNS="b1 8 1 plain,plain_packed,plain_measured,fixed,fixed_copy,policy,prompt_lookup 1,4
b4 8 4 plain,plain_measured,fixed,fixed_copy,policy 1,3,4
b16 16 16 plain,plain_measured,fixed,policy 1,2"
for temperature in 0 1; do
  while read -r name limit batch methods sizes; do
    tag=${name}_t$temperature
    if compgen -G "$OUT/results_${tag}*.json" > /dev/null; then echo "$tag: measured before"; continue; fi
    .venv/bin/blockpilot bench --target default --prompts humaneval --copy-tokens 5 --out "$OUT" --tag "$tag" \
      --limit "$limit" --max-new-tokens 128 --temperature "$temperature" --batch-sizes "$batch" \
      --methods "$methods" --block-sizes "$sizes" < /dev/null
  done <<< "$RUNS"
done
