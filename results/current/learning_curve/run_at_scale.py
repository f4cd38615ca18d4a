"""The run at scale while it trains: HumanEval tau of its checkpoints against the rows it has seen, beside the baseline
recipe's curve, with the learning rate each checkpoint was taken at.

Usage: python results/current/learning_curve/run_at_scale.py RECORD OUT_DIR
  e.g. python results/current/learning_curve/run_at_scale.py \
    "results/current/study_runs/curve-target_layer_ids_1,8,14,20,27_loss_weighting_confidence_batch_size_8_epochs_6-2000000" \
    results/current/learning_curve

RECORD is the run's committed record: `checkpoint_labels/step-N.jsonl` (a checkpoint labelled on all 164 problems),
`humaneval_labels.jsonl` once the run has finished, and `training_log.json` (rows a step, steps, the learning rate
along the way). `STUDY=checkpoints bash examples/drafter_study.sh` labels the newest checkpoint of a run still
training, keeps its labels and log in the record and calls this script.

The x-axis is rows seen (steps times rows a step), so runs of other step sizes share it; mid-run, the learning rate is
still high (cosine decay to the run's end), so a checkpoint reads low against a finished run of as many rows. The
baseline curve (`curve-N`, 3 epochs, steps of 16 rows) comes from RECORD's sibling folders. Writes
OUT_DIR/run_at_scale.json and OUT_DIR/run_at_scale.png.

Once the run has finished, the JSON says what tau 3 at B = 16 would take if the run went on gaining per doubling of
rows seen what the baseline's finished runs gained, or what its own checkpoints gained (fitted slopes, moved to pass
through the finished point): rows, steps and hours at this run's own pace. Extrapolations, reported as such.
"""

import json
import math
import sys
from pathlib import Path

from plot import HUMANEVAL_PROBLEMS, TARGET_TAU, fit_log_line, read_labels, summary  # the curve's script, beside this


def learning_rate_at(history: list[dict], step: int) -> float | None:
    """The learning rate of the last logged step at or before `step`."""
    logged = [entry for entry in history if entry["step"] <= step]
    return logged[-1]["lr"] if logged else None


SLOPE_NAMES = {"baseline": "the baseline's slope", "checkpoints": "its checkpoints' slope"}


def tau_3_estimate(finished: dict, slopes: dict[str, float], rows_a_step: int, seconds_a_step: float) -> dict:
    """Rows, steps and hours to tau 3 at B = 16 from `finished`, along each of `slopes` (tau per ln(rows seen))."""
    estimate = {
        "from": {"rows_seen": finished["rows_seen"], "tau_b16": finished["tau_b16"]},
        "reached": finished["tau_b16"] >= TARGET_TAU,
        "seconds_a_step": seconds_a_step,  # the run's own: its log's seconds over its steps, paused time included
        "assumes": "the gain per doubling of rows seen goes on as it went; rows seen past the data in hand mean more "
        "epochs over it, whose worth past 6 is not measured",
        "along": {},
    }
    for name, slope in slopes.items():
        along = {"slope_per_doubling": slope * math.log(2)}
        if not estimate["reached"] and slope > 0:
            rows = finished["rows_seen"] * math.exp((TARGET_TAU - finished["tau_b16"]) / slope)
            # A whole run of that length from the start (its learning rate decays over all of it), not steps added.
            along.update(rows_seen=round(rows), steps=round(rows / rows_a_step))
            along["hours"] = along["steps"] * seconds_a_step / 3600
        estimate["along"][name] = along
    return estimate


def main(record: str, out_dir: str) -> None:
    record, out_dir = Path(record), Path(out_dir)
    log = json.loads((record / "training_log.json").read_text())
    rows_a_step, total_steps = log["args"]["batch_size"], log["steps"]
    history = log.get("history", [])
    points = []
    labelled = {int(path.stem.removeprefix("step-")): path for path in record.glob("checkpoint_labels/step-*.jsonl")}
    for step, path in sorted(labelled.items()):
        rows = read_labels(path)
        if rows is None:
            print(f"{path}: not all {HUMANEVAL_PROBLEMS} problems labelled yet, left out", file=sys.stderr)
            continue
        points.append({"step": step, "rows_seen": step * rows_a_step, "lr": learning_rate_at(history, step),
                       **summary(rows)})
    final = read_labels(record / "humaneval_labels.jsonl")
    if final is not None:
        points.append(
            {"step": total_steps, "rows_seen": total_steps * rows_a_step, "finished": True, **summary(final)}
        )
    baseline = []
    for run in record.parent.glob("curve-*"):
        tokens = run.name.removeprefix("curve-")
        labels, training_log = read_labels(run / "humaneval_labels.jsonl"), run / "training_log.json"
        if tokens.isdigit() and labels is not None and training_log.is_file():
            args = json.loads(training_log.read_text())
            rows_seen = args["steps"] * args["args"]["batch_size"]
            baseline.append({"training_tokens": int(tokens), "rows_seen": rows_seen, **summary(labels)})
    baseline.sort(key=lambda p: p["rows_seen"])
    result = {
        "run": record.name,
        "rows_a_step": rows_a_step,
        "checkpoints": points,
        "baseline_curve": baseline,
        "problems": HUMANEVAL_PROBLEMS,
        "decoding": "greedy",
    }
    if final is not None:
        # The baseline's slope is of finished runs; the run's own is of checkpoints taken while its learning rate came
        # down (each reads lower than a finished run of as many rows would), which makes it the optimistic one.
        slopes = {}
        for name, curve in (("baseline", baseline), ("checkpoints", points[:-1])):
            if len(curve) >= 2:
                slopes[name] = fit_log_line([p["rows_seen"] for p in curve], [p["tau_b16"] for p in curve])[1]
        result["tau_3_estimate"] = tau_3_estimate(points[-1], slopes, rows_a_step, log["seconds"] / total_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_at_scale.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if baseline:
        ax.plot([p["rows_seen"] for p in baseline], [p["tau_b16"] for p in baseline], marker="o", color="C0",
                label="baseline recipe, 3 epochs over 0.25-2M tokens (finished)")
    if points:
        ax.plot([p["rows_seen"] for p in points], [p["tau_b16"] for p in points], marker="s", color="C3",
                label=f"run at scale, steps of {rows_a_step} rows (checkpoints)")
        for p in points:
            note = "finished" if p.get("finished") else f"step {p['step']}, lr {p['lr']:.1e}"
            ax.annotate(note, (p["rows_seen"], p["tau_b16"]), textcoords="offset points", xytext=(4, -12), fontsize=7)
    estimate = result.get("tau_3_estimate", {})
    for (name, along), style in zip(estimate.get("along", {}).items(), ("--", ":")):
        if "rows_seen" in along:
            start = estimate["from"]
            ax.plot([start["rows_seen"], along["rows_seen"]], [start["tau_b16"], TARGET_TAU], linestyle=style,
                    color="C3", alpha=0.6, label=f"on along {SLOPE_NAMES[name]}: a run of ~{along['hours']:.0f} h")
    ax.axhline(TARGET_TAU, color="grey", linestyle=":", label=f"target tau {TARGET_TAU:g}")
    ax.set_xscale("log")
    ax.set_xlabel("rows seen (optimizer steps x rows a step)")
    ax.set_ylabel("mean tau at B = 16, HumanEval (164, greedy)")
    ax.set_title("The run at scale against the baseline curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "run_at_scale.png", dpi=120)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
