#!/usr/bin/env bash
# Copies the newest checkpoint of every study drafter still training (no model.safetensors yet) into its committed
# record, results/current/study_runs/NAME/checkpoint/step-N (weights, optimizer and scheduler state, RNG: 89 MB for
# the 2-layer drafter), replacing an older one, so that hours of training outlive the cache directory; a finished
# drafter's checkpoint is removed from its record. On a new machine `examples/drafter_study.sh` resumes from it.
# Run it before a session ends, while (or after) the study trains:
#   bash examples/snapshot_training.sh
set -euo pipefail
CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot_hf}
RUNS=${RUNS:-$CACHE/study}
RESULTS=${RESULTS:-results/current}
shopt -s nullglob
for checkpoints in "$RUNS"/*/checkpoints "$RUNS"/*/*/checkpoints; do
  run=${checkpoints%/checkpoints}
  name=${run#"$RUNS"/}
  record="$RESULTS/study_runs/$name/checkpoint"
  if [ -f "$run/model.safetensors" ]; then
    [ ! -d "$record" ] || { rm -rf "$record"; echo "$name: finished; its checkpoint left the record"; }
    continue
  fi
  newest=$(find "$checkpoints" -maxdepth 1 -name 'step-*' -printf '%f\n' | sort -t- -k2 -n | tail -1)
  [ -n "$newest" ] || continue
  if [ -d "$record/$newest" ]; then
    echo "$name: $newest kept already"
    continue
  fi
  mkdir -p "$record"
  cp -r "$checkpoints/$newest" "$record/$newest.partial"  # a kill mid-copy leaves no checkpoint that looks whole
  find "$record" -mindepth 1 -maxdepth 1 ! -name "$newest.partial" -exec rm -rf {} +
  mv "$record/$newest.partial" "$record/$newest"
  echo "$name: $newest kept in $record ($(du -sh "$record" | cut -f1))"
done
