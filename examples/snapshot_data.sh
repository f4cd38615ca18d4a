#!/usr/bin/env bash
# Copies the drafter data's complete shards (4,096 rows each), gzipped, and its run log into the repository, so that
# hours of generation outlive the cache directory (a new machine starts without one). A shard copied once is not
# copied again: a complete shard never changes. On a new machine, before resuming the generator:
#   .venv/bin/blockpilot data-merge results/current/drafter_data/rows --into ~/.cache/blockpilot_hf/data/smollm2-scale-v1
set -euo pipefail
CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot_hf}
DATA=${DATA:-$CACHE/data/smollm2-scale-v1}
ROWS=${ROWS:-results/current/drafter_data/rows}
ROWS_PER_SHARD=${ROWS_PER_SHARD:-4096}
mkdir -p "$ROWS"
for shard in "$DATA"/shard-*.jsonl; do
  [ -f "$shard" ] || continue
  copy=$ROWS/$(basename "$shard").gz
  [ -f "$copy" ] && continue
  rows=$(wc -l < "$shard")
  if [ "$rows" -lt "$ROWS_PER_SHARD" ]; then
    echo "$(basename "$shard"): $rows of $ROWS_PER_SHARD rows, still being written; not copied"
    continue
  fi
  gzip -9 -n -c "$shard" > "$copy.partial" && mv "$copy.partial" "$copy"
  echo "$(basename "$shard") -> $copy ($(du -h "$copy" | cut -f1))"
done
# The run log (exact commands, package versions, prompt-set hashes) goes along: data-merge merges it too.
[ ! -f "$DATA/runs.json" ] || cp "$DATA/runs.json" "$ROWS/runs.json"
