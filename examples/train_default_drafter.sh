#!/usr/bin/env bash
# Regenerate the training data with SmolLM2-135M-Instruct itself and train the shipped drafter(s), end to end.
# One command; on a GPU it is what produced blockpilot_hf/artifacts/smollm2-135m-dflash-b16 (see its model card).
#
#   bash examples/train_default_drafter.sh                 # GPU or CPU (slow: hours), bf16 autocast where fast
#   PROMPTS=my_prompts.jsonl NUM_PROMPTS=200 ... bash examples/train_default_drafter.sh
#
# Knobs (environment): PROMPTS (builtin | JSONL), NUM_PROMPTS, GEN_BATCH, GEN_BUDGET (s), MAX_NEW_TOKENS,
# LAYERS (space separated list of draft depths to train and compare), TRAIN_BUDGET (s per drafter), EPOCHS,
# BATCH, OUT (run folder), DTYPE, MAX_STEPS, TRAIN_BLOCK_SIZES (block layouts cycled per step, e.g. 4,16,2,4,8,16:
# the layouts the target hardware decodes with; default 16 only), DRAFT_VOCAB (tokens the drafter may propose, the
# most frequent of its training responses: a cheaper draft head; default 16384 as shipped, 0 for the whole vocabulary).
set -euo pipefail
OUT=${OUT:-runs/smollm2}
PROMPTS=${PROMPTS:-builtin}
NUM_PROMPTS=${NUM_PROMPTS:-3000}
GEN_BATCH=${GEN_BATCH:-512}
GEN_BUDGET=${GEN_BUDGET:-}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
LAYERS=${LAYERS:-"2 4"}
TRAIN_BUDGET=${TRAIN_BUDGET:-}
EPOCHS=${EPOCHS:-6}
BATCH=${BATCH:-32}
MAX_STEPS=${MAX_STEPS:-}
DRAFT_VOCAB=${DRAFT_VOCAB:-16384}
# bf16 autocast where bf16 products are fast (GPUs, AVX-512 CPUs: half the time per step on 2 cores), else fp32
DTYPE=${DTYPE:-$(python3 -c "import torch; from blockpilot_hf.modeling_drafter import has_fast_bf16; print('bf16' if has_fast_bf16('cuda' if torch.cuda.is_available() else 'cpu') else 'fp32')")}
mkdir -p "$OUT"
first=1
for L in $LAYERS; do
  extra=()
  [ -n "$GEN_BUDGET" ] && extra+=(--generation-time-budget "$GEN_BUDGET")
  [ -n "$TRAIN_BUDGET" ] && extra+=(--time-budget "$TRAIN_BUDGET")
  [ -n "$MAX_STEPS" ] && extra+=(--max-steps "$MAX_STEPS")
  [ -n "${TRAIN_BLOCK_SIZES:-}" ] && extra+=(--train-block-sizes "$TRAIN_BLOCK_SIZES")
  [ "$first" = 1 ] || extra+=(--skip-generation)
  python3 -m blockpilot_hf.cli train-drafter --target default --dtype "$DTYPE" \
    --prompts "$PROMPTS" --num-prompts "$NUM_PROMPTS" --data "$OUT/responses.jsonl" \
    --generation-batch-size "$GEN_BATCH" --max-new-tokens "$MAX_NEW_TOKENS" \
    --output-dir "$OUT/drafter-L$L" --num-layers "$L" --block-size 16 \
    --batch-size "$BATCH" --epochs "$EPOCHS" --target-name HuggingFaceTB/SmolLM2-135M-Instruct "${extra[@]}"
  if [ "$DRAFT_VOCAB" != 0 ]; then
    python3 -m blockpilot_hf.cli draft-vocab --drafter "$OUT/drafter-L$L" --data "$OUT/responses.jsonl" --size "$DRAFT_VOCAB"
  fi
  first=0
  [ -n "${AFTER_EACH:-}" ] && eval "$AFTER_EACH"
done
