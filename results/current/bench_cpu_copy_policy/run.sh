#!/usr/bin/env bash
# The block policy that also chooses the copy chain (issue 17) against fixed arms and plain decoding: every method
# interleaved per prompt, one run per batch size, greedy, on this machine's 2 cores.
#   bash results/current/bench_cpu_copy_policy/run.sh [POLICY]   (from the repository root; ~25 minutes on a 2-core Xeon)
# POLICY defaults to the shipped one. A run whose results JSON exists is skipped, so a killed script resumes.
set -euo pipefail
source examples/jemalloc.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=results/current/bench_cpu_copy_policy
POLICY=${1:-blockpilot_hf/artifacts/smollm2-135m-blockpilot}
bench() {  # TAG, then bench options
  local tag=$1
  shift
  if compgen -G "$OUT/results_${tag}*.json" > /dev/null; then echo "$tag: measured before"; return; fi
  .venv/bin/blockpilot bench --target default --prompts humaneval --copy-tokens 5 --policy "$POLICY" --out "$OUT" \
    --tag "$tag" "$@"
}
bench b1_t0 --limit 8 --max-new-tokens 128 --batch-sizes 1 --methods plain,plain_packed,fixed,fixed_copy,policy \
  --block-sizes 1,4
bench b4_t0 --limit 8 --max-new-tokens 128 --batch-sizes 4 --methods plain,plain_packed,fixed,fixed_copy,policy \
  --block-sizes 1,3,4
bench b16_t0 --limit 16 --max-new-tokens 128 --batch-sizes 16 --methods plain,plain_packed,fixed,policy --block-sizes 1,2
