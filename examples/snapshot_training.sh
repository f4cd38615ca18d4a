#!/usr/bin/env bash
# Copies the newest checkpoint of every study drafter still training (no model.safetensors yet) into its committed
# record, results/current/study_runs/NAME/checkpoint/step-N (weights, optimizer and scheduler state, RNG: 89 MB for
# the 2-layer drafter), replacing an older one, so that hours of training outlive the cache directory. Once such a
# drafter has finished, its weights replace the checkpoint and the record itself loads as the drafter (beside the
# config and training log it keeps anyway; a run long enough to need checkpoints is one worth shipping:
# `examples/ship_drafter.sh` reads it from there on any machine); a finished drafter that never had a checkpoint kept
# keeps only its labels. On a new machine `examples/drafter_study.sh` resumes an unfinished one from its checkpoint.
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
    if [ -d "$record" ]; then
      kept=${record%/checkpoint}
      # The study's labelling writes the same config and log here once it is done; this may run before it has.
      cp "$run/config.json" "$kept/"
      [ ! -f "$run/training_log.json" ] || cp "$run/training_log.json" "$kept/"
      cp "$run/model.safetensors" "$kept/model.safetensors.partial"  # a kill mid-copy leaves no weights that load
      mv "$kept/model.safetensors.partial" "$kept/model.safetensors"
      rm -rf "$record"
      echo "$name: finished; its weights replace its checkpoint, and $kept loads as the drafter"
    fi
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
