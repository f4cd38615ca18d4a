#!/usr/bin/env bash
# The shipped policy from scratch (`make policy`; ~25 minutes on a 2-core AMD EPYC): labels with and without a 5-token
# copy chain on the 120 policy prompts and on HumanEval, greedy and at T = 1; this machine's step costs with and
# without the chain; then the policy, trained on the policy prompts' labels, reported on HumanEval's, deciding by the
# step costs of every machine in $COSTS (this machine's the default, or the table DEFAULT_COSTS names), into
# $POLICY_OUT. `examples/ship_drafter.sh` copies it into blockpilot_hf/artifacts.
#   bash examples/make_policy.sh
# The target's answers are generated once and reused (HumanEval's are committed with the drafter study's records). The
# 120 policy prompts are a committed file: the policy split of the `builtin` mix samples library code from the
# installed packages, so it moves with their versions.
# Resumable: a labelling resumes from its last prompt, and a machine whose table is in $COSTS is not measured again
# (delete its file to measure it anew). A smoke test of the pipeline points LABELS, COSTS, POLICY_OUT and the
# continuations files elsewhere, with LIMIT=N (prompts of each set), REPEATS=N (timed rounds a step), and TARGET,
# DRAFTER, BLOCK_SIZES and MAX_NEW_TOKENS for small models.
set -euo pipefail
source "$(dirname "$0")/jemalloc.sh"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BLOCKPILOT=${BLOCKPILOT:-.venv/bin/blockpilot}
PYTHON=${PYTHON:-.venv/bin/python}
LABELS=${LABELS:-results/current/labels}
COSTS=${COSTS:-results/current/step_costs_by_machine}
POLICY_OUT=${POLICY_OUT:-runs/policy}
POLICY_CONTINUATIONS=${POLICY_CONTINUATIONS:-runs/continuations/policy_prompts.jsonl}
HUMANEVAL_CONTINUATIONS=${HUMANEVAL_CONTINUATIONS:-results/current/study_runs/humaneval_continuations.jsonl}
TARGET=${TARGET:-default}
DRAFTER=${DRAFTER:-}  # a drafter folder; empty: the shipped one
BLOCK_SIZES=${BLOCK_SIZES:-2,3,4,6,8,16}
COPY_TOKENS=5
drafter=()
[ -z "$DRAFTER" ] || drafter=(--drafter "$DRAFTER")
limit=()
[ -z "${LIMIT:-}" ] || limit=(--limit "$LIMIT")

# label PROMPTS CONTINUATIONS OUT TEMPERATURE
label() {
  "$BLOCKPILOT" collect-labels --target "$TARGET" "${drafter[@]}" --prompts "$1" --continuations "$2" --out "$3" \
    --block-sizes "$BLOCK_SIZES" --copy-tokens "$COPY_TOKENS" --temperature "$4" \
    --max-new-tokens "${MAX_NEW_TOKENS:-256}" "${limit[@]}" < /dev/null
}
mkdir -p "$LABELS"
label "$LABELS/policy_prompts.jsonl" "$POLICY_CONTINUATIONS" "$LABELS/policy_prompts_b1-16_copy5.jsonl" 0
label humaneval "$HUMANEVAL_CONTINUATIONS" "$LABELS/humaneval_b1-16_copy5.jsonl" 0
label "$LABELS/policy_prompts.jsonl" "$POLICY_CONTINUATIONS" "$LABELS/policy_prompts_b1-16_copy5_t1.jsonl" 1
label humaneval "$HUMANEVAL_CONTINUATIONS" "$LABELS/humaneval_b1-16_copy5_t1.jsonl" 1

here=$COSTS/$("$PYTHON" -c 'from blockpilot_hf.hardware import machine_file_name as name, machine_of
print(name(machine_of("cpu")))')
if [ ! -f "$here" ]; then
  "$BLOCKPILOT" bench --target "$TARGET" "${drafter[@]}" --block-sizes "$BLOCK_SIZES" --batch-sizes 1,2,4,8,16 \
    --repeats "${REPEATS:-24}" --copy-tokens "$COPY_TOKENS" --step-costs "$COSTS" < /dev/null
fi

"$BLOCKPILOT" train-policy --target "$TARGET" "${drafter[@]}" \
  --labels "$LABELS/policy_prompts_b1-16_copy5.jsonl,$LABELS/policy_prompts_b1-16_copy5_t1.jsonl" \
  --eval-labels "$LABELS/humaneval_b1-16_copy5.jsonl,$LABELS/humaneval_b1-16_copy5_t1.jsonl" \
  --objective throughput --cost-file "${DEFAULT_COSTS:-$here},$COSTS" \
  --epochs 30 --hidden-size 64 --weight-decay 0.1 --head-epochs 100 --output-dir "$POLICY_OUT" < /dev/null
