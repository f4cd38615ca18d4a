#!/usr/bin/env bash
# The README's "Where it stands" benches: the shipped drafter, its policy and the copy chain against plain decoding in
# both product forms on HumanEval, every method interleaved per prompt after a warm-up prompt, one run per batch size
# (1, 4, 16) and decoding mode (greedy first, then T = 1), into OUT (2-10 minutes a run on 2 CPU cores):
#   bash examples/bench_side_by_side.sh results/current/bench_cpu_scale_drafter
# A run whose results JSON exists in OUT is skipped, so a killed script resumes with the next run. DRAFTER and POLICY
# (folders) bench others than the shipped pair, on TARGET; LIMIT=N caps every run at N problems, MAX_NEW_TOKENS its
# answers (a smoke test).
set -euo pipefail
source "$(dirname "$0")/jemalloc.sh"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:?usage: bash examples/bench_side_by_side.sh OUT_DIR}
BLOCKPILOT=${BLOCKPILOT:-.venv/bin/blockpilot}
artifacts=()
[ -z "${DRAFTER:-}" ] || artifacts+=(--drafter "$DRAFTER")
[ -z "${POLICY:-}" ] || artifacts+=(--policy "$POLICY")
# One run per line: name, problems, batch size, methods, fixed block sizes (those the policy picks among them, so that
# it meets the best fixed size; RUNS replaces the lines). `plain_packed` (every product packed) is the best plain
# decoder at batch 1 only; above it `plain_measured` packs each product where this machine timed it faster.
RUNS=${RUNS:-"b1 8 1 plain,plain_packed,plain_measured,fixed,fixed_copy,policy,prompt_lookup 1,2,4,8,16
b4 8 4 plain,plain_measured,fixed,fixed_copy,policy 1,2,4,8
b16 16 16 plain,plain_measured,fixed,policy 1,2,4"}
mkdir -p "$OUT"
for temperature in 0 1; do
  while read -r name limit batch methods sizes; do
    tag=${name}_t$temperature
    if compgen -G "$OUT/results_${tag}*.json" > /dev/null; then echo "$tag: measured before"; continue; fi
    "$BLOCKPILOT" bench --target "${TARGET:-default}" "${artifacts[@]}" --prompts humaneval --copy-tokens 5 \
      --out "$OUT" --tag "$tag" --limit "${LIMIT:-$limit}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" \
      --temperature "$temperature" --batch-sizes "$batch" --methods "$methods" --block-sizes "$sizes" < /dev/null
  done <<< "$RUNS"
done
