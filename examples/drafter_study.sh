#!/usr/bin/env bash
# The drafter study of issue 16: a learning curve (one drafter per amount of training data) and ablations (one
# recipe change each, at the curve's smallest amount), every drafter labelled on all 164 HumanEval problems at B = 4
# and B = 16 (greedy, 256 new tokens), each drafter shape's step timed, then JSON + PNG under results/current/:
#   nohup bash examples/drafter_study.sh >> ~/.cache/blockpilot_hf/study/study.log 2>&1 &
# Ablations run first (they choose the recipe), then the curve; STUDY=curve or STUDY=ablations runs one part, and
# STUDY=checkpoints labels the newest checkpoint of each drafter still training (beside it, a run of many sessions
# measured on the way), and STUDY=on trains a finished drafter on over rows it has not read (below). Two jobs sharing
# this machine's 2 cores (e.g. with the data generator) run best with OMP_NUM_THREADS=1 each.
# Resumable: a drafter whose labels and costs exist is skipped, and so is one whose committed record
# (results/current/study_runs) holds complete labels; a killed training resumes from its last checkpoint (every 50
# steps; on a new machine from the one `examples/snapshot_training.sh` committed), a killed labelling from its last
# prompt; curve points the data does not hold yet are left for a later run.
# The target's features live in one store per layer choice that all drafters share (their rows are prefixes of one
# another), and the target's HumanEval answers are generated once for all drafters (and kept with the records).
set -euo pipefail
source "$(dirname "$0")/jemalloc.sh"  # where installed: freed memory kept, not re-faulted
source "$(dirname "$0")/cpu_dtype.sh"  # DTYPE: bf16 where the CPU has bf16 dot products, else fp32
BLOCKPILOT=${BLOCKPILOT:-.venv/bin/blockpilot}
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot_hf}
DATA=${DATA:-$CACHE/data/smollm2-scale-v1}
RUNS=${RUNS:-$CACHE/study}
RESULTS=${RESULTS:-results/current}  # where the curve's and the ablations' JSON + PNG go
STUDY=${STUDY:-all}
POINTS=${POINTS:-"250000 500000 1000000 2000000"}
ABLATION_TOKENS=${ABLATION_TOKENS:-250000}
EPOCHS=${EPOCHS:-3}
# The ablations, one recipe change each, in the order they run (a subset or another order: ABLATIONS="soft-targets
# gamma-4"). What the drafter starts from and reads comes first, the loss weighting after: a study cut short by the
# machine's hours has then answered the questions most likely to move tau.
ABLATIONS=${ABLATIONS:-"init-from-target 5-target-layers soft-targets 3-draft-layers confidence-weighting
  1-epoch-3x-data 6-epochs batch-8 lr-1.2e-3 gamma-4 gamma-10 5-draft-layers"}
# The curve's recipe changes, once the ablations have chosen (e.g. CURVE_OPTIONS="--num-layers 3 --gamma 4"); its
# points then go to curve-<options>-N so that they never mix with the baseline's.
CURVE_OPTIONS=${CURVE_OPTIONS:-}
# STUDY=on: the finished drafter ON_FROM (a record or drafter folder; the shipped run at scale by default) trained on
# over the ON_TOKENS response tokens after the first ON_SKIP (the rows its run read), each row once, with a fresh
# warm-up and cosine and its run's recipe (ON_OPTIONS). Rows read once gain nothing from a feature store, so the
# target computes their features every step (a step of 8 rows ~7 s on a 2-core EPYC, ~3 s from a store), and a new
# machine resumes with nothing to make again. Its run is on-ON_SKIP-ON_TOKENS, labelled, kept and snapshotted as the
# others are.
AT_SCALE=curve-target_layer_ids_1,8,14,20,27_loss_weighting_confidence_batch_size_8_epochs_6-2000000
ON_FROM=${ON_FROM:-"$RESULTS/study_runs/$AT_SCALE"}
ON_SKIP=${ON_SKIP:-2000000}
ON_TOKENS=${ON_TOKENS:-8000000}
ON_OPTIONS=${ON_OPTIONS:-"--target-layer-ids 1,8,14,20,27 --loss-weighting confidence --batch-size 8 --epochs 1"}
# option_value NAME OPTIONS...: the value of the last NAME among OPTIONS (as argparse takes it), empty if none.
option_value() {
  local name=$1
  shift
  printf '%s\n' "$@" | awk -v name="$name" 'prev == name {value = $0} {prev = $0} END {print value}'
}

# train_and_label NAME TOKENS [train-drafter options that differ from the recipe]
# The recipe: 2 draft layers reading target layers 1 and 27 (the shipped shape), block 16 trained with 4- and 16-token
# blocks, the 16K most frequent response tokens as draft vocabulary, DFlash's decay weighting, 3 epochs. The target's
# features come from a store shared by the runs that read the same layers, except for a run given --skip-train-tokens
# (STUDY=on), which reads its rows once.
train_and_label() {
  local name=$1 tokens=$2 out="$RUNS/$1"
  shift 2
  local options=(--num-layers 2 --target-layer-ids 1,27 "$@")
  local layers skipped
  layers=$(option_value --target-layer-ids "${options[@]}")
  skipped=$(option_value --skip-train-tokens "${options[@]}")
  skipped=${skipped:-0}
  local store_suffix=""  # soft targets need a store that also keeps the final hidden state
  if [[ " ${options[*]} " == *" --soft-targets "* ]]; then store_suffix="-final"; fi
  local store=(--feature-store "$CACHE/feature_store/smollm2-scale-v1-layers-${layers//,/-}$store_suffix")
  [ "$skipped" -eq 0 ] || store=()
  local record="$RESULTS/study_runs/$name/humaneval_labels.jsonl"
  if [ ! -f "$out/model.safetensors" ] && [ -f "$record" ] && [ "$(grep -c . "$record")" -ge 164 ]; then
    # What the tables and the curve read is committed: a new machine need not spend hours making it again.
    echo "$name: labelled on all 164 problems before ($record); not trained again"
    return
  fi
  if [ $((tokens + skipped)) -gt "$available" ]; then
    echo "$name: needs $((tokens + skipped)) response tokens, the data holds $available; left for a later run"
    return
  fi
  if [ ! -f "$out/model.safetensors" ]; then
    local kept_checkpoint="$RESULTS/study_runs/$name/checkpoint"  # examples/snapshot_training.sh
    if [ ! -d "$out/checkpoints" ] && [ -d "$kept_checkpoint" ]; then
      mkdir -p "$out/checkpoints"
      cp -r "$kept_checkpoint"/step-* "$out/checkpoints/"
      echo "$name: resuming from the committed $(ls "$kept_checkpoint")"
    fi
    "$BLOCKPILOT" train-drafter --target default --dtype "$DTYPE" --data "$DATA" --skip-generation \
      --max-train-tokens "$tokens" --output-dir "$out" --block-size 16 --train-block-sizes 4,16 \
      --draft-vocab-size 16384 "${store[@]}" --batch-size 16 --epochs "$EPOCHS" --save-every 50 \
      --target-name HuggingFaceTB/SmolLM2-135M-Instruct \
      "${options[@]}"
  fi
  "$BLOCKPILOT" collect-labels --target default --drafter "$out" --prompts humaneval --block-sizes 4,16 \
    --max-new-tokens 256 --continuations "$ANSWERS" --out "$out/humaneval_labels.jsonl"
  keep_record "$name"
}

# keep_record NAME: what the tables and the curve are made of (labels without their prefill features, training log,
# config, step costs), ~50 KB a drafter, into $RESULTS/study_runs/NAME: committed, it outlives the cache directory,
# and summarize.py / plot.py read it as they read $RUNS.
keep_record() {
  local from="$RUNS/$1" to="$RESULTS/study_runs/$1"
  mkdir -p "$to"
  local kept_answers="$RESULTS/study_runs/humaneval_continuations.jsonl" kept_count  # see main()
  kept_count=$(grep -sc . "$kept_answers" || true)
  if [ -f "$ANSWERS" ] && [ "$(grep -c . "$ANSWERS")" -gt "${kept_count:-0}" ]; then cp "$ANSWERS" "$kept_answers"; fi
  keep_labels "$from/humaneval_labels.jsonl" "$to/humaneval_labels.jsonl"
  local name
  for name in training_log.json config.json step_costs.json; do
    [ ! -f "$from/$name" ] || cp "$from/$name" "$to/$name"
  done
}

# keep_labels FROM TO: a labels file without its rows' prefill features (what the policy reads, ~10 KB a row; the
# records need tau and steps only).
keep_labels() {
  $PYTHON - "$1" "$2" <<'PY'
import json, sys
source, target = sys.argv[1:]
with open(source) as f, open(target, "w") as out:
    for line in f:
        if line.strip():
            row = json.loads(line)
            row.pop("summary_features", None)
            out.write(json.dumps(row) + "\n")
PY
}

# ablation_options NAME: the train-drafter options of one ablation.
ablation_options() {
  case $1 in
    3-draft-layers) echo --num-layers 3 ;;
    5-draft-layers) echo --num-layers 5 ;;
    5-target-layers) echo --target-layer-ids 1,8,14,20,27 ;;
    # As many steps as the baseline, over three times its rows once each: does fresh data beat repeated data at the
    # same compute? (It decides whether a run at scale needs epochs, and so a feature store, at all.)
    1-epoch-3x-data) echo --epochs 1 ;;
    # Twice the baseline's steps over its rows: set beside the curve's next point (as many steps over twice the rows),
    # it says whether the curve rises with data or with steps.
    6-epochs) echo --epochs 6 ;;
    # A drafter short of steps may learn more per core-hour from more, smaller steps (the same rows and epochs, twice
    # the steps at half the rows each) or from a larger step size (twice DFlash's 6e-4).
    batch-8) echo --batch-size 8 ;;
    lr-1.2e-3) echo --learning-rate 1.2e-3 ;;
    gamma-4) echo --gamma 4 ;;
    gamma-10) echo --gamma 10 ;;
    confidence-weighting) echo --loss-weighting confidence ;;
    soft-targets) echo --soft-targets ;;
    init-from-target) echo --init-layers-from-target 28,29 ;;
    *)
      echo "unknown ablation '$1' in ABLATIONS; known: 3-draft-layers 5-draft-layers 5-target-layers gamma-4" \
        "gamma-10 confidence-weighting soft-targets init-from-target 1-epoch-3x-data 6-epochs batch-8 lr-1.2e-3" >&2
      return 1
      ;;
  esac
}

# measure_step_costs NAME...: seconds of a draft + verify step at batch 1 (B = 4, 16) and of a plain step. They depend
# on the drafter's shape only (layers, target layers), so each shape is timed once, with the first of NAMEs (drafters
# of one shape) that this machine has, unless one of them was timed before (its record holds the costs).
measure_step_costs() {
  local name
  for name in "$@"; do
    [ ! -f "$RESULTS/study_runs/$name/step_costs.json" ] || return 0
  done
  for name in "$@"; do
    if [ -f "$RUNS/$name/model.safetensors" ] && [ -f "$RUNS/$name/humaneval_labels.jsonl" ]; then
      "$BLOCKPILOT" bench --target default --drafter "$RUNS/$name" --step-costs "$RUNS/$name/step_costs.json" \
        --batch-sizes 1 --block-sizes 4,16 --repeats 20
      keep_record "$name"
      return
    fi
  done
}

# label_checkpoints: the newest checkpoint of every drafter still training, labelled on HumanEval as a finished one
# is (a checkpoint loads as a drafter), its labels kept without their prefill features in the record's
# checkpoint_labels/ beside the training log so far, then the run's progress drawn against the baseline curve
# (results/current/learning_curve/run_at_scale.py). Run it beside the training (STUDY=checkpoints): the two share the
# cores for the ~4 minutes of labels.
label_checkpoints() {
  local checkpoints run name newest record labels
  shopt -s nullglob
  for checkpoints in "$RUNS"/*/checkpoints "$RUNS"/*/*/checkpoints; do
    run=${checkpoints%/checkpoints}
    name=${run#"$RUNS"/}
    record="$RESULTS/study_runs/$name"
    [ ! -f "$run/model.safetensors" ] || continue  # finished: its own labels say more
    # config.json is written last: a checkpoint without it is still being saved (or predates checkpoints as drafters)
    newest=$(find "$checkpoints" -maxdepth 2 -path '*/step-*/config.json' -printf '%h\n' | xargs -r -n1 basename \
      | sort -t- -k2 -n | tail -1)
    if [ -z "$newest" ]; then echo "$name: no checkpoint that loads as a drafter yet"; continue; fi
    if [ -f "$record/checkpoint_labels/$newest.jsonl" ]; then echo "$name: $newest labelled before"; continue; fi
    labels="$run/checkpoint_labels/$newest"
    mkdir -p "$labels.drafter"  # a copy: the training keeps two checkpoints, and the labels take longer than two saves
    cp "$checkpoints/$newest"/{config.json,model.safetensors,training_log.json} "$labels.drafter/"
    "$BLOCKPILOT" collect-labels --target default --drafter "$labels.drafter" --prompts humaneval --block-sizes 4,16 \
      --max-new-tokens 256 --continuations "$ANSWERS" --out "$labels.jsonl"
    mkdir -p "$record/checkpoint_labels"
    keep_labels "$labels.jsonl" "$record/checkpoint_labels/$newest.jsonl"
    cp "$labels.drafter/training_log.json" "$record/training_log.json"
    rm -rf "$labels.drafter"
    # run_at_scale.png draws a run from its first step (the curve's runs); a run trained on from a finished drafter
    # (STUDY=on) keeps its labels only, so that it never replaces that drawing.
    case $name in
      curve-*) $PYTHON results/current/learning_curve/run_at_scale.py "$record" "$RESULTS/learning_curve" >/dev/null ;;
    esac
    echo "$name: $newest labelled into $record/checkpoint_labels"
  done
}

# All of the run is in main(): bash reads it whole before running and exits on the line that calls it, so this file
# can be edited while a study runs.
main() {
  mkdir -p "$RUNS"
  # The target's HumanEval answers that every drafter is labelled on take ~12 minutes of a core and depend on the
  # target alone (collect-labels refuses another target's): the records keep a copy, which seeds a new machine.
  ANSWERS="$RUNS/humaneval_continuations.jsonl"
  local kept_answers="$RESULTS/study_runs/humaneval_continuations.jsonl"
  if [ ! -f "$ANSWERS" ] && [ -f "$kept_answers" ]; then cp "$kept_answers" "$ANSWERS"; fi
  if [ "$STUDY" = checkpoints ]; then
    label_checkpoints
    return
  fi
  available=$($PYTHON -c "import sys; from blockpilot_hf.training.data import read_responses, response_tokens as r
print(sum(len(r(row)) for row in read_responses(sys.argv[1])))" "$DATA")
  echo "$(date -u +%FT%TZ) $available response tokens in $DATA"
  if [ "$STUDY" = on ]; then
    # shellcheck disable=SC2086  # the options are words
    train_and_label "on-$ON_SKIP-$ON_TOKENS" "$ON_TOKENS" --init-drafter "$ON_FROM" --skip-train-tokens "$ON_SKIP" \
      $ON_OPTIONS
    return
  fi

  if [ "$STUDY" != curve ]; then
    # Ablations first: they choose the recipe. The baseline is the curve's point at ABLATION_TOKENS.
    local name options
    for name in $ABLATIONS; do ablation_options "$name" > /dev/null; done  # a typo fails before hours of training
    train_and_label "curve-$ABLATION_TOKENS" "$ABLATION_TOKENS"
    local set="ablations-$ABLATION_TOKENS"  # one folder per size, so that sizes never mix in a table
    for name in $ABLATIONS; do
      options=$(ablation_options "$name")
      local tokens=$ABLATION_TOKENS
      [ "$name" != 1-epoch-3x-data ] || tokens=$((3 * ABLATION_TOKENS))
      # shellcheck disable=SC2086  # the options are words
      train_and_label "$set/$name" "$tokens" $options
    done
    # A step's cost depends on the drafter's shape only: the baseline's and the ablations that change it
    local same_shape=("curve-$ABLATION_TOKENS")
    for name in $ABLATIONS; do
      case $name in 3-draft-layers | 5-draft-layers | 5-target-layers) measure_step_costs "$set/$name" ;;
        *) same_shape+=("$set/$name") ;;
      esac
    done
    measure_step_costs "${same_shape[@]}"
    # From the records: they hold every drafter labelled so far, on this machine or on one before it.
    local records="$RESULTS/study_runs"
    $PYTHON results/current/ablations/summarize.py "$records/$set" "$records/curve-$ABLATION_TOKENS" \
      "$RESULTS/ablations"
    $PYTHON results/current/learning_curve/steps_or_data.py "$records" "$RESULTS/learning_curve"
  fi
  if [ "$STUDY" != ablations ]; then
    local tag=""
    [ -z "$CURVE_OPTIONS" ] || tag="$(echo "$CURVE_OPTIONS" | tr -s ' -' '_' | sed 's/^_//')-"
    for tokens in $POINTS; do
      # shellcheck disable=SC2086  # the options are words
      train_and_label "curve-$tag$tokens" "$tokens" $CURVE_OPTIONS
    done
    if [ -z "$tag" ]; then
      $PYTHON results/current/learning_curve/plot.py "$RUNS" "$RESULTS/learning_curve" curve-
    else  # another recipe's run: drawn beside the baseline's curve, which it must not replace
      for tokens in $POINTS; do
        [ ! -f "$RESULTS/study_runs/curve-$tag$tokens/humaneval_labels.jsonl" ] \
          || $PYTHON results/current/learning_curve/run_at_scale.py "$RESULTS/study_runs/curve-$tag$tokens" \
            "$RESULTS/learning_curve" > /dev/null
      done
    fi
  fi
}

main "$@"; exit  # on main's line: a running study never reads what an edit appends
