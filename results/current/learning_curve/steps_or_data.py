"""Does the learning curve follow the rows a drafter sees or the optimizer steps it takes?

Usage: python results/current/learning_curve/steps_or_data.py STUDY_RUNS OUT_DIR
  e.g. python results/current/learning_curve/steps_or_data.py results/current/study_runs results/current/learning_curve

Every point of the learning curve (`STUDY_RUNS/curve-N`, N training tokens) trains 3 epochs, so its steps double
with its rows. Two ablations of `examples/drafter_study.sh` at 0.5M tokens pull the two apart: `1-epoch-3x-data` (the
baseline's steps over three times its rows, each once) and `6-epochs` (twice its steps over its own rows). Drawn
against steps, the points of one line are "steps decide"; points off the line say what rows add. A third, `batch-8`
(twice the baseline's steps of half its rows each: the baseline's compute), says what a step's rows add. Reads each
drafter's `humaneval_labels.jsonl` (all 164 problems) and `training_log.json`; writes OUT_DIR/steps_or_data.json and
OUT_DIR/steps_or_data.png. Runs not labelled on all 164 problems yet are left out (and named).
"""

import json
import sys
from pathlib import Path

from plot import HUMANEVAL_PROBLEMS, read_labels, summary  # the curve's own script, beside this one

# The ablations that change the rows seen, the epochs or the rows a step, and the training tokens they read (the
# study's definitions).
ABLATION_TOKENS = 500_000
STEP_ABLATIONS = {"1-epoch-3x-data": 3 * ABLATION_TOKENS, "6-epochs": ABLATION_TOKENS, "batch-8": ABLATION_TOKENS}


def point(run: Path, training_tokens: int) -> dict | None:
    rows = read_labels(run / "humaneval_labels.jsonl")
    if rows is None:
        return None
    log = json.loads((run / "training_log.json").read_text())
    epochs = log["args"]["epochs"]
    return {
        "drafter": run.name,
        "training_tokens": training_tokens,
        "epochs": epochs,
        "token_epochs": training_tokens * epochs,
        "steps": log["steps"],
        "batch_size": log["args"]["batch_size"],
        **summary(rows),
    }


def main(study_runs: str, out_dir: str) -> None:
    study_runs, out_dir = Path(study_runs), Path(out_dir)
    # The baseline recipe's curve only (curve-N; a series of other options is named curve-<options>-N).
    curve_runs = {
        int(run.name.removeprefix("curve-")): run
        for run in study_runs.glob("curve-*")
        if run.name.removeprefix("curve-").isdigit()
    }
    runs = [(curve_runs[tokens], tokens) for tokens in sorted(curve_runs)]
    runs += [(study_runs / f"ablations-{ABLATION_TOKENS}" / name, tokens) for name, tokens in STEP_ABLATIONS.items()]
    curve, ablations, missing = [], [], []
    for run, tokens in runs:
        found = point(run, tokens)
        if found is None:
            missing.append(run.name)
        elif run.name.startswith("curve-"):
            curve.append(found)
        else:
            ablations.append(found)
    if missing:
        left_out = ", ".join(missing)
        print(f"Not labelled on all {HUMANEVAL_PROBLEMS} problems yet, left out: {left_out}", file=sys.stderr)
    if not curve:
        # Not an error: the study calls this after its ablations, also before any curve point is labelled.
        print(f"No steps-or-data plot yet: no curve-N in {study_runs} has complete labels.", file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"curve": curve, "step_ablations": ablations, "problems": HUMANEVAL_PROBLEMS, "decoding": "greedy"}
    (out_dir / "steps_or_data.json").write_text(json.dumps(result, indent=1))

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["steps"] for p in curve], [p["tau_b16"] for p in curve], marker="o", label="curve: 3 epochs over N")
    for p in curve:
        where = (p["steps"], p["tau_b16"])
        ax.annotate(f"{p['training_tokens'] / 1e6:g}M", where, textcoords="offset points", xytext=(4, -12), fontsize=8)
    for p, marker, color in zip(ablations, "^vs", ("C1", "C2", "C3")):
        epochs = f"{p['epochs']} epoch" + ("s" if p["epochs"] != 1 else "")
        rows = f"{p['training_tokens'] / 1e6:g}M"
        label = f"{p['drafter']}: {epochs} over {rows} ({p['steps']} steps of {p['batch_size']} rows)"
        ax.scatter([p["steps"]], [p["tau_b16"]], marker=marker, color=color, s=60, zorder=3, label=label)
    ax.set_xscale("log")
    ticks = [p["steps"] for p in curve]  # the ablations' steps sit at the curve's (their legend says how many)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.set_xlabel("optimizer steps (of 16 rows unless the legend says otherwise)")
    ax.set_ylabel("mean tau at B = 16, HumanEval (164, greedy)")
    ax.set_title("Steps or rows? Drafter tau against steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "steps_or_data.png", dpi=120)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
