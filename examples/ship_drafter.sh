#!/usr/bin/env bash
# Ships a trained drafter as the embedded default, with everything that depends on it measured again (~50 minutes
# on a 2-core AMD EPYC with AVX512-BF16, 2026-12-07; resumable):
#   nohup bash examples/ship_drafter.sh DRAFTER_DIR ARCHIVE BENCH >> ship.log 2>&1 &
# e.g. DRAFTER_DIR ~/.cache/blockpilot_hf/study/<run>, ARCHIVE drafter_v3_2M (what it replaces is kept in
# results/archive/ARCHIVE), BENCH bench_cpu_v4_drafter (its benches go to results/current/BENCH).
#  1. What the shipped drafter's numbers are made of moves to results/archive/ARCHIVE: both model cards, the policy
#     labels and the step-cost tables (every table prices the old drafter's step, the other machines' too).
#  2. The drafter goes to blockpilot_hf/artifacts/smollm2-135m-dflash-b16 in bf16 (as the loop runs it on CPUs with
#     bf16 products), with its training log.
#  3. `examples/make_policy.sh`: labels, this machine's step costs, the policy; the policy's weights, config and
#     report go to blockpilot_hf/artifacts/smollm2-135m-blockpilot.
#  4. `examples/bench_side_by_side.sh` into results/current/BENCH.
# The model cards stay hand-written (model_cards/ and their copies beside the weights): the script ends by printing
# the numbers they quote. Steps 1-2 are skipped once the artifact holds this drafter; 3 and 4 resume where they
# stopped.
# A smoke test points ARTIFACTS and RESULTS at copies elsewhere and sets the knobs of the two scripts it runs (LIMIT,
# REPEATS, RUNS, TARGET, BLOCK_SIZES, MAX_NEW_TOKENS, the continuations files; tests/test_examples.py does).
set -euo pipefail
DRAFTER=${1:?usage: bash examples/ship_drafter.sh DRAFTER_DIR ARCHIVE BENCH}
ARCHIVE=${2:?name the archive of the drafter it replaces, e.g. drafter_v3_2M}
BENCH=${3:?name the bench folder, e.g. bench_cpu_v4_drafter}
PYTHON=${PYTHON:-.venv/bin/python}
ARTIFACTS=${ARTIFACTS:-blockpilot_hf/artifacts}
RESULTS=${RESULTS:-results}
DRAFTER_ARTIFACT=$ARTIFACTS/smollm2-135m-dflash-b16
POLICY_ARTIFACT=$ARTIFACTS/smollm2-135m-blockpilot
LABELS=$RESULTS/current/labels
COSTS=$RESULTS/current/step_costs_by_machine
if [ ! -f "$DRAFTER/model.safetensors" ]; then
  echo "$DRAFTER holds no model.safetensors: not a finished drafter" >&2
  exit 2
fi

shipped() {  # whether the artifact holds this drafter's weights (in bf16)
  "$PYTHON" - "$DRAFTER" "$DRAFTER_ARTIFACT" <<'PY'
import sys, torch
from safetensors.torch import load_file
new, shipped = (load_file(f"{path}/model.safetensors") for path in sys.argv[1:])
same = new.keys() == shipped.keys() and all(torch.equal(new[k].to(torch.bfloat16), shipped[k]) for k in new)
sys.exit(0 if same else 1)
PY
}

if ! shipped; then
  archive=$RESULTS/archive/$ARCHIVE
  # An archive of this name is this ship's own, killed before the drafter was in place, only if it holds these cards.
  if [ -e "$archive" ] && ! cmp -s model_cards/smollm2-135m-dflash-b16.md "$archive/model_card.md"; then
    echo "$archive holds another drafter's cards: name another archive" >&2
    exit 2
  fi
  mkdir -p "$archive/labels" "$archive/step_costs_by_machine"
  cp model_cards/smollm2-135m-dflash-b16.md "$archive/model_card.md"
  cp model_cards/smollm2-135m-blockpilot.md "$archive/policy_model_card.md"
  find "$LABELS" -maxdepth 1 -name '*_b1-16_*.jsonl' -exec mv {} "$archive/labels/" \;
  find "$COSTS" -maxdepth 1 -name '*.json' -exec mv {} "$archive/step_costs_by_machine/" \;
  "$PYTHON" - "$DRAFTER" "$DRAFTER_ARTIFACT" <<'PY'
import os, shutil, sys
import torch
from blockpilot_hf import DFlashDrafter
source, artifact = sys.argv[1:]
DFlashDrafter.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(artifact)
if os.path.isfile(f"{source}/training_log.json"):
    shutil.copy(f"{source}/training_log.json", f"{artifact}/training_log.json")
PY
  echo "shipped $DRAFTER into $DRAFTER_ARTIFACT; what it replaces is in $archive"
fi

POLICY_OUT=${POLICY_OUT:-runs/policy}
DRAFTER=$DRAFTER_ARTIFACT LABELS=$LABELS COSTS=$COSTS POLICY_OUT=$POLICY_OUT bash "$(dirname "$0")/make_policy.sh"
for name in model.safetensors training_report.json observations.png eval_observations.png; do
  cp "$POLICY_OUT/$name" "$POLICY_ARTIFACT/$name"
done
"$PYTHON" - "$POLICY_OUT/config.json" "$POLICY_ARTIFACT/config.json" "$(basename "$DRAFTER_ARTIFACT")" <<'PY'
import json, sys
source, artifact, drafter_name = sys.argv[1:]
config = json.loads(open(source).read())
config["drafter_name_or_path"] = drafter_name  # the shipped drafter beside it, not a path on the training machine
open(artifact, "w").write(json.dumps(config, indent=2, sort_keys=True) + "\n")
PY

DRAFTER=$DRAFTER_ARTIFACT POLICY=$POLICY_ARTIFACT \
  bash "$(dirname "$0")/bench_side_by_side.sh" "$RESULTS/current/$BENCH"

echo "== For the model cards =="
"$PYTHON" - "$LABELS" "$RESULTS/current/$BENCH" <<'PY'
import json, sys
from pathlib import Path
labels, bench = map(Path, sys.argv[1:])
for path in sorted(labels.glob("*_b1-16_*.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key in ("tau", "tau_copy"):  # per prompt, then the mean over prompts (as the learning curve reads tau)
        taus = {size: sum(row[key][size] for row in rows) / len(rows) for size in rows[0][key]}
        print(f"{path.name} ({len(rows)} prompts) {key}: " + ", ".join(f"B={s} {t:.3f}" for s, t in taus.items()))
for table in sorted(bench.glob("results_*.md")):
    print(f"\n{table.name}\n{table.read_text()}")
PY
