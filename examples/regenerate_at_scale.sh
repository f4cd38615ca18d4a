#!/usr/bin/env bash
# Drafter data at scale: the default target's own responses (greedy + one sample at T 0.7 or 1.0 per prompt) to the
# drafter share of the `scale` prompt mix (~56K prompts), written as resumable shards under the cache directory.
# Runs for many hours on a CPU: start it in the background and rerun the same command to resume, e.g.
#   nohup bash examples/regenerate_at_scale.sh >> ~/.cache/blockpilot_hf/regenerate.log 2>&1 &
# then `blockpilot data-manifest "$DATA" --out results/current/drafter_data/manifest.json` for the committed manifest.
set -euo pipefail
source "$(dirname "$0")/jemalloc.sh"  # where installed: freed memory kept, not re-faulted
BLOCKPILOT=${BLOCKPILOT:-.venv/bin/blockpilot}
CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot_hf}
DATA=${DATA:-$CACHE/data/smollm2-scale-v1}
source "$(dirname "$0")/cpu_dtype.sh"  # DTYPE: bf16 where the CPU has bf16 dot products, else fp32
# The decoder's features of every new row (target layers 1 and 27, what the study's drafters read) go to the study's
# feature store, so that training needs no target pass over those rows: that pass took ~28 % of the time of making
# drafter data. 0.5-0.9 MB a row; FEATURE_STORE= (empty) generates the rows alone.
FEATURE_STORE=${FEATURE_STORE-$CACHE/feature_store/smollm2-scale-v1-layers-1-27}
features=()
[ -z "$FEATURE_STORE" ] || features=(--feature-store "$FEATURE_STORE" --target-layer-ids 1,27 --max-length 768)
exec "$BLOCKPILOT" regenerate --target default --dtype "$DTYPE" --prompts scale --data "$DATA" \
    --batch-size "${BATCH_SIZE:-128}" --sampled-copies 1 --temperatures 0.7,1.0 --max-new-tokens 256 \
    --max-prompt-tokens 512 "${features[@]}" "$@"
