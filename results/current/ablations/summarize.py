"""One table of the ablations `examples/drafter_study.sh` ran: per drafter, HumanEval tau at B = 4 and B = 16, its
measured step costs at batch 1, and what they predict for greedy decoding speed.

Usage: python results/current/ablations/summarize.py ABLATIONS BASELINE OUT_DIR
ABLATIONS holds one directory per change (e.g. ~/.cache/blockpilot_hf/study/ablations-250000/gamma-4) and BASELINE
is the drafter they change one thing of (e.g. ~/.cache/blockpilot_hf/study/curve-250000); each
with `humaneval_labels.jsonl` (164 rows when complete), `training_log.json` and, for one drafter of each shape
(draft layers, target layers), `step_costs.json` (`blockpilot bench --step-costs`): a step's cost depends on the shape
only, so drafters of one shape share those costs. Writes OUT_DIR/ablations.json, ablations.md and ablations.png.

Predicted speed over plain decoding at block size B = tokens committed per step / (step cost at B / plain step cost),
with tokens per step counted over the whole set (new tokens / steps): what the loop at batch 1 gains if nothing but
the steps costs time. It ranks recipes by speed, not by tau alone (a deeper drafter accepts more and costs more).
"""

import json
import sys
from pathlib import Path

HUMANEVAL_PROBLEMS = 164
BLOCK_SIZES = ("4", "16")


def read_labels(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if len(rows) == HUMANEVAL_PROBLEMS else None


def shape(directory: Path) -> tuple[int, int]:
    """What a step's cost depends on: draft layers and target layers read."""
    config = json.loads((directory / "config.json").read_text())
    return config["num_hidden_layers"], len(config["target_layer_ids"])


def summarize(directory: Path, costs_by_shape: dict) -> dict | None:
    rows = read_labels(directory / "humaneval_labels.jsonl")
    if rows is None or shape(directory) not in costs_by_shape:
        return None
    costs = costs_by_shape[shape(directory)]
    args = json.loads((directory / "training_log.json").read_text())["args"]
    out = {
        "drafter": directory.name,
        "draft_layers": args["num_layers"],
        "target_layers": args["target_layer_ids"],
        "plain_step_ms": 1000 * costs["1"],
    }
    for b in BLOCK_SIZES:
        tokens_per_step = sum(r["new_tokens"] - 1 for r in rows) / sum(r["steps"][b] for r in rows)
        out[f"tau_b{b}"] = sum(r["tau"][b] for r in rows) / len(rows)
        out[f"step_ms_b{b}"] = 1000 * costs[b]
        out[f"predicted_speedup_b{b}"] = tokens_per_step / (costs[b] / costs["1"])
    return out


def main(ablations: str, baseline: str, out_dir: str) -> None:
    baseline, out_dir = Path(baseline), Path(out_dir)
    ablations = Path(ablations)
    drafters = [baseline] + (sorted(d for d in ablations.iterdir() if d.is_dir()) if ablations.is_dir() else [])
    costs_by_shape = {
        shape(d): json.loads((d / "step_costs.json").read_text())["1"]
        for d in drafters
        if (d / "step_costs.json").is_file()
    }
    base = summarize(baseline, costs_by_shape)
    if base is None:
        # Not an error: the study calls this after every run, also before its baseline is done.
        print(f"No ablations table yet: {baseline} has no complete labels and step costs.", file=sys.stderr)
        return
    base["drafter"] = f"{baseline.name} (baseline)"
    table = [base] + [s for d in drafters[1:] if (s := summarize(d, costs_by_shape)) is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.json").write_text(json.dumps(table, indent=1))
    lines = [
        "| drafter | tau B=4 | tau B=16 | step ms B=4 | step ms B=16 | plain ms | predicted x plain, B=4 | B=16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['drafter']} | {r['tau_b4']:.2f} | {r['tau_b16']:.2f} | {r['step_ms_b4']:.1f} | "
            f"{r['step_ms_b16']:.1f} | {r['plain_step_ms']:.1f} | {r['predicted_speedup_b4']:.2f} | "
            f"{r['predicted_speedup_b16']:.2f} |"
        )
    (out_dir / "ablations.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(table) + 1.5))
    names = [r["drafter"] for r in table]
    for i, b in enumerate(BLOCK_SIZES):
        ax.barh(
            [j + 0.4 * i for j in range(len(table))],
            [r[f"predicted_speedup_b{b}"] for r in table],
            height=0.4,
            label=f"B = {b}",
        )
    ax.set_yticks([j + 0.2 for j in range(len(table))], names)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("predicted greedy speed over plain decoding, batch 1")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "ablations.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
