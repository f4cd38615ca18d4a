#!/usr/bin/env bash
# Drafter + block policy for your own target, end to end (CPU, one GPU, or `LAUNCH="accelerate launch"` for many).
#   TARGET=Qwen/Qwen3-0.6B OUT=runs/qwen3 bash examples/train_your_own.sh
# Knobs: PROMPTS (builtin | JSONL of {"prompt": ...}), NUM_PROMPTS, LABEL_PROMPTS, MAX_NEW_TOKENS, LAYERS, BLOCK_SIZE,
#        MAX_STEPS, CANDIDATES.
set -euo pipefail
TARGET=${TARGET:?set TARGET to a path or Hub id}
OUT=${OUT:-runs/own}
LAUNCH=${LAUNCH:-python3}
[ "$LAUNCH" = python3 ] && RUN="python3 -m blockpilot_hf.cli" || RUN="$LAUNCH -m blockpilot_hf.cli"
BLOCK_SIZE=${BLOCK_SIZE:-16}
CANDIDATES=${CANDIDATES:-$((BLOCK_SIZE-2)),$((BLOCK_SIZE-1)),$BLOCK_SIZE,$((BLOCK_SIZE+1)),$((BLOCK_SIZE+2))}
$RUN train-drafter --target "$TARGET" --prompts "${PROMPTS:-builtin}" --num-prompts "${NUM_PROMPTS:-2000}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-256}" --data "$OUT/responses.jsonl" --output-dir "$OUT/drafter" \
  --num-layers "${LAYERS:-2}" --block-size "$BLOCK_SIZE" ${MAX_STEPS:+--max-steps "$MAX_STEPS"}
# propose only the most frequent tokens of the training responses (a cheaper draft head; DRAFT_VOCAB=0: all of them)
[ "${DRAFT_VOCAB:-16384}" = 0 ] || python3 -m blockpilot_hf.cli draft-vocab --drafter "$OUT/drafter" \
  --data "$OUT/responses.jsonl" --size "${DRAFT_VOCAB:-16384}"
$RUN collect-labels --target "$TARGET" --drafter "$OUT/drafter" --prompts "${PROMPTS:-builtin}" \
  --limit "${LABEL_PROMPTS:-300}" --max-new-tokens "${MAX_NEW_TOKENS:-256}" --block-sizes "$CANDIDATES" --out "$OUT/labels.jsonl"
python3 -m blockpilot_hf.cli train-policy --labels "$OUT/labels.jsonl" --drafter "$OUT/drafter" --target "$TARGET" \
  --output-dir "$OUT/policy"
echo "drafter: $OUT/drafter  policy: $OUT/policy (held-out report: $OUT/policy/training_report.json)"
