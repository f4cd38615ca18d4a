"""Tau on HumanEval against training tokens, from the points `examples/drafter_study.sh` made.

Usage: python results/current/learning_curve/plot.py RUNS OUT_DIR [PREFIX] (examples/drafter_study.sh runs it)
Points already in OUT_DIR/learning_curve.json whose runs RUNS no longer holds are kept.
RUNS holds one `PREFIXN/` per point (PREFIX `curve-` unless given) (its drafter's `humaneval_labels.jsonl`, 164 rows
when complete, and its `training_log.json`) and, optionally, `shipped_humaneval_b4-16.jsonl` (the labels of the
drafter shipped before the study, 0.91M tokens of another recipe, drawn as a reference). Writes
OUT_DIR/learning_curve.json and OUT_DIR/learning_curve.png. Tau is the mean over problems of each
problem's mean acceptance length, as `collect-labels` and the README report it. With three points or more, a line
fitted to tau against log(tokens) says how many tokens it would take to reach tau 3 at B = 16 if the curve went on as
it did: an extrapolation, reported as such.
"""

import json
import math
import sys
from pathlib import Path

from blockpilot_hf.training.data import read_jsonl

HUMANEVAL_PROBLEMS = 164
BLOCK_SIZES = ("4", "16")
TARGET_TAU = 3.0


def read_labels(path: Path) -> list[dict] | None:
    """All of a drafter's HumanEval labels, or None while they are not all written (a torn last line included: the
    file may be read while `collect-labels` writes it)."""
    rows = read_jsonl(path)
    return rows if len(rows) == HUMANEVAL_PROBLEMS else None


def summary(rows: list[dict]) -> dict:
    out = {}
    for b in BLOCK_SIZES:
        out[f"tau_b{b}"] = sum(r["tau"][b] for r in rows) / len(rows)
        # Token-weighted: new tokens per verify step over the whole set.
        out[f"tokens_per_step_b{b}"] = sum(r["new_tokens"] - 1 for r in rows) / sum(r["steps"][b] for r in rows)
    return out


def fit_log_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares `y = a + b ln x`."""
    lx = [math.log(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / sum((u - mx) ** 2 for u in lx)
    return my - b * mx, b


def main(runs: str, out_dir: str, prefix: str = "curve-") -> None:
    runs, out_dir = Path(runs), Path(out_dir)
    points = []
    found = [p for p in runs.glob(prefix + "*") if p.name[len(prefix) :].isdigit()]
    for point in sorted(found, key=lambda p: int(p.name[len(prefix) :])):
        rows = read_labels(point / "humaneval_labels.jsonl")
        if rows is None:
            continue
        log = json.loads((point / "training_log.json").read_text())
        points.append(
            {
                "training_tokens": int(point.name[len(prefix) :]),
                "epochs": log["args"]["epochs"],
                "steps": log["steps"],
                **summary(rows),
            }
        )
    previous = out_dir / "learning_curve.json"
    committed = json.loads(previous.read_text()) if previous.is_file() else {}
    if committed.get("runs") == prefix + "N":
        # A point whose run is gone (a new machine starts without the cache directory) keeps its committed numbers:
        # this file is then its only record. A point in RUNS replaces the committed one.
        made = {p["training_tokens"] for p in points}
        kept = [p for p in committed["points"] if p["training_tokens"] not in made]
        points = sorted(points + kept, key=lambda p: p["training_tokens"])
    else:
        committed = {}
    if not points:
        # Not an error: the study calls this after every run, also before its first point is labelled.
        print(f"No learning curve yet: no {prefix}N/ in {runs} has complete HumanEval labels.", file=sys.stderr)
        return
    result = {
        "runs": prefix + "N",
        "points": points,
        "problems": HUMANEVAL_PROBLEMS,
        "max_new_tokens": 256,
        "decoding": "greedy",
    }
    shipped = read_labels(runs / "shipped_humaneval_b4-16.jsonl")
    if shipped is not None:
        # Another recipe (its model card: GPU epochs on 4,608 rows, then a CPU stage): a reference, not a curve point.
        result["shipped"] = {
            "training_tokens": 910_000,
            "recipe": "the shipped drafter's (model card)",
            **summary(shipped),
        }
    elif "shipped" in committed:
        result["shipped"] = committed["shipped"]
    if len(points) >= 3:
        a, slope = fit_log_line([p["training_tokens"] for p in points], [p["tau_b16"] for p in points])
        result["fit_b16"] = {"tau": f"{a:.3f} + {slope:.3f} ln(tokens)", "a": a, "b": slope}
        if slope > 0:
            result["fit_b16"]["tokens_for_tau_3_if_the_trend_holds"] = math.exp((TARGET_TAU - a) / slope)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning_curve.json").write_text(json.dumps(result, indent=1))

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [p["training_tokens"] for p in points]
    for b, marker in zip(BLOCK_SIZES, "os"):
        ax.plot(xs, [p[f"tau_b{b}"] for p in points], marker=marker, label=f"B = {b}")
    if "shipped" in result:
        for b, marker in zip(BLOCK_SIZES, "os"):
            ax.scatter(
                [910_000],
                [result["shipped"][f"tau_b{b}"]],
                marker=marker,
                facecolors="none",
                edgecolors="gray",
                label=f"drafter shipped before the study, B = {b}" if b == "16" else None,
            )
    if "fit_b16" in result:
        fit = result["fit_b16"]
        span = [min(xs), max(xs) * 8]
        ax.plot(span, [fit["a"] + fit["b"] * math.log(x) for x in span], ls=":", color="C1", label="B = 16, log fit")
    ax.axhline(TARGET_TAU, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    # The points and the doublings the fit is drawn over (that drafter's 0.91M would crowd 1M: the legend names it).
    ticks = sorted(set(xs) | ({max(xs) * 2**k for k in (1, 2, 3)} if "fit_b16" in result else set()))
    ax.set_xticks(ticks, [f"{x / 1e6:g}M" for x in ticks])
    ax.set_xlabel("training tokens (target-regenerated responses)")
    ax.set_ylabel("mean tau, HumanEval (164, greedy)")
    ax.set_title("Drafter learning curve, SmolLM2-135M-Instruct")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=120)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
