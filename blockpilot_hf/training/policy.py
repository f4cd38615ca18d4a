"""Training the block policy on collected labels, with an honest held-out evaluation.

Labels come from `training/labels.py`: per prompt, tau at every candidate block size. The class of a prompt is the
best candidate under an objective:

* `"tau"` (the paper): argmax of tau, smallest size on ties;
* `"throughput"`: argmax of tau(b) / cost(b), where cost(b) is the measured time of one decoding step at block size b
  (target verification + drafter), so a larger block must earn its extra cost.

The report compares, on prompts the policy never saw: every fixed block size, the policy, and the per-prompt oracle.
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configuration import BlockPolicyConfig
from ..modeling_policy import BlockPolicy
from .data import read_jsonl
from .labels import prefill_logits_file_name


@dataclass
class PolicyTrainingArguments:
    labels: str
    output_dir: str
    eval_labels: str | None = None
    feature: str = "prefill_summary"
    objective: str = "tau"
    candidate_block_sizes: list[int] | None = None
    epochs: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    hidden_size: int = 256
    num_hidden_layers: int = 2
    dropout: float = 0.1
    heldout_fraction: float = 0.25
    seed: int = 0
    logits_dir: str | None = None
    cost_file: str | None = None


def best_block_sizes(rows: list[dict], candidates: list[int], objective: str = "tau", costs: dict | None = None) -> list[int]:
    """Class index of the best candidate per row (ties -> the smaller block size)."""
    labels = []
    for row in rows:
        scores = []
        for b in candidates:
            tau = row["tau"][str(b)]
            scores.append(tau / costs[b] if objective == "throughput" else tau)
        best = max(scores)
        tied = [i for i, s in enumerate(scores) if s >= best - 1e-12]
        labels.append(min(tied, key=lambda i: candidates[i]))
    return labels


def pooled_tau(rows: list[dict], chosen_sizes: list[int]) -> float:
    """Mean tokens per decoding step over every step of every prompt, each prompt at its chosen block size."""
    tokens = sum(row["tau"][str(b)] * row["steps"][str(b)] for row, b in zip(rows, chosen_sizes))
    steps = sum(row["steps"][str(b)] for row, b in zip(rows, chosen_sizes))
    return tokens / max(1, steps)


def pooled_time(rows: list[dict], chosen_sizes: list[int], costs: dict) -> float:
    """Estimated decoding seconds: steps x measured step cost at the chosen block size."""
    return sum(row["steps"][str(b)] * costs[b] for row, b in zip(rows, chosen_sizes))


def feature_matrix(rows: list[dict], feature: str, logits_dir: str | None = None) -> torch.Tensor:
    if feature == "prefill_summary":
        return torch.tensor([row["summary_features"] for row in rows], dtype=torch.float32)
    if logits_dir is None:
        raise ValueError("The prefill_distribution feature needs --logits-dir (collect-labels --logits-dir).")
    from safetensors.torch import load_file

    def logits_file(prompt_id: str) -> Path:
        # One folder per label run (e.g. logits/policy, logits/humaneval) may sit under the given one.
        name = prefill_logits_file_name(prompt_id)
        found = [Path(logits_dir) / name, *Path(logits_dir).glob(f"*/{name}")]
        for path in found:
            if path.is_file():
                return path
        raise FileNotFoundError(f"No saved prefill logits for {prompt_id!r} under {logits_dir}.")

    logits = [load_file(str(logits_file(row["prompt_id"])))["last_logits"] for row in rows]
    return torch.softmax(torch.stack(logits).float(), dim=-1)


def split_rows(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    rows = sorted(rows, key=lambda r: r["prompt_id"])
    random.Random(seed).shuffle(rows)
    n_heldout = max(1, int(round(heldout_fraction * len(rows))))
    return rows[n_heldout:], rows[:n_heldout]


def fit_policy(config: BlockPolicyConfig, features: torch.Tensor, labels: list[int], args: PolicyTrainingArguments) -> BlockPolicy:
    """Full-batch AdamW on standardised features with class-balanced cross-entropy."""
    torch.manual_seed(args.seed)
    policy = BlockPolicy(config)
    policy.feature_mean.copy_(features.mean(0))
    policy.feature_std.copy_(features.std(0).clamp(min=1e-4) if len(features) > 1 else torch.ones(features.shape[1]))
    y = torch.tensor(labels)
    counts = torch.bincount(y, minlength=len(config.candidate_block_sizes)).float()
    # Rare classes would otherwise never be predicted; weights are capped to keep noise from dominating.
    weights = (counts.sum() / counts.clamp(min=1) / len(counts)).clamp(max=10.0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    policy.train()
    for _ in range(args.epochs):
        loss = F.cross_entropy(policy(features), y, weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def evaluate(policy: BlockPolicy, rows: list[dict], features: torch.Tensor, labels: list[int], costs: dict | None) -> dict:
    """Held-out accuracy, and tau (and estimated time) of the policy vs every fixed size vs the per-prompt oracle."""
    candidates = policy.config.candidate_block_sizes
    with torch.no_grad():
        predicted = policy(features).argmax(-1).tolist()
    chosen = [candidates[i] for i in predicted]
    oracle = [candidates[i] for i in best_block_sizes(rows, candidates)]
    report = {
        "prompts": len(rows),
        "accuracy": sum(p == t for p, t in zip(predicted, labels)) / max(1, len(rows)),
        "tau_policy": pooled_tau(rows, chosen),
        "tau_oracle": pooled_tau(rows, oracle),
        "tau_fixed": {str(b): pooled_tau(rows, [b] * len(rows)) for b in candidates},
        "chosen_histogram": {str(b): chosen.count(b) for b in candidates},
        "oracle_histogram": {str(b): oracle.count(b) for b in candidates},
    }
    best_fixed = max(candidates, key=lambda b: report["tau_fixed"][str(b)])
    report["best_fixed_block_size"] = best_fixed
    report["policy_vs_best_fixed"] = report["tau_policy"] / report["tau_fixed"][str(best_fixed)]
    report["policy_vs_oracle"] = report["tau_policy"] / report["tau_oracle"]
    if costs is not None:
        report["time_policy_s"] = pooled_time(rows, chosen, costs)
        report["time_fixed_s"] = {str(b): pooled_time(rows, [b] * len(rows), costs) for b in candidates}
        time_oracle = [min(candidates, key=lambda b: row["steps"][str(b)] * costs[b]) for row in rows]
        report["time_oracle_s"] = pooled_time(rows, time_oracle, costs)
    return report


def plot_observations(rows: list[dict], candidates: list[int], training_block_size: int | None, out_png: Path) -> dict:
    """The paper's two observations on our pair: how often the best size differs from the training size, and how
    concentrated it is around it; plus tau-vs-block-size curves (the PNG needs matplotlib, the numbers do not)."""
    best = [candidates[i] for i in best_block_sizes(rows, candidates)]
    stats = {"best_histogram": {str(b): best.count(b) for b in candidates}}
    if training_block_size is not None:
        stats["fraction_best_differs_from_training_size"] = sum(b != training_block_size for b in best) / max(1, len(best))
        stats["fraction_within_1_of_training_size"] = sum(abs(b - training_block_size) <= 1 for b in best) / max(1, len(best))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {out_png.name} (pip install blockpilot-hf[bench])")
        return stats
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows[:40]:
        axes[0].plot(candidates, [row["tau"][str(b)] for b in candidates], color="0.7", lw=0.6)
    axes[0].plot(candidates, [pooled_tau(rows, [b] * len(rows)) for b in candidates], "o-", color="C0", lw=2, label="pooled")
    axes[0].set_xlabel("block size")
    axes[0].set_ylabel("tau")
    axes[0].set_title("tau vs block size (grey: single prompts)")
    axes[0].legend()
    axes[1].bar([str(b) for b in candidates], [best.count(b) for b in candidates])
    axes[1].set_xlabel("best block size (argmax tau)")
    axes[1].set_ylabel("prompts")
    axes[1].set_title("per-prompt best block size")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return stats


def train_policy_from_files(args: PolicyTrainingArguments, target_name: str | None = None, drafter_path: str | None = None):
    """Train on `args.labels` (minus a held-out split), report on the held-out split and on `args.eval_labels`."""
    from ..modeling_drafter import DFlashDrafter

    rows = read_jsonl(args.labels)
    if len(rows) < 4:
        raise ValueError(f"{args.labels} has {len(rows)} labelled prompts; collect more with `blockpilot collect-labels`.")
    available = sorted({int(b) for b in rows[0]["tau"]})
    candidates = args.candidate_block_sizes or available
    missing = [b for b in candidates if b not in available]
    if missing:
        raise ValueError(f"Labels have no tau for block sizes {missing}; recollect with those sizes.")
    costs = None
    if args.cost_file:
        costs = {int(b): float(c) for b, c in json.loads(Path(args.cost_file).read_text()).items()}
    if args.objective == "throughput" and costs is None:
        raise ValueError("--objective throughput needs --cost-file (step costs from `blockpilot bench --step-costs`).")
    drafter_config = DFlashDrafter.config_class.from_pretrained(drafter_path) if drafter_path else None

    train_rows, heldout_rows = split_rows(rows, args.heldout_fraction, args.seed)
    x_train = feature_matrix(train_rows, args.feature, args.logits_dir)
    y_train = best_block_sizes(train_rows, candidates, args.objective, costs)
    hidden = len(rows[0]["summary_features"]) - 4
    vocab = drafter_config.target_vocab_size if drafter_config is not None else None
    config = BlockPolicyConfig(
        candidate_block_sizes=candidates,
        feature=args.feature,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        dropout=args.dropout,
        input_size=x_train.shape[1],
        target_hidden_size=hidden,
        target_vocab_size=vocab,
        target_name_or_path=target_name if target_name != "default" else "HuggingFaceTB/SmolLM2-135M-Instruct",
        drafter_name_or_path=str(drafter_path) if drafter_path else None,
        drafter_block_size=drafter_config.block_size if drafter_config is not None else None,
        label_objective=args.objective,
    )
    policy = fit_policy(config, x_train, y_train, args)
    report = {"args": asdict(args), "train_prompts": len(train_rows)}
    report["heldout"] = evaluate(
        policy, heldout_rows, feature_matrix(heldout_rows, args.feature, args.logits_dir),
        best_block_sizes(heldout_rows, candidates, args.objective, costs), costs,
    )
    report["train"] = evaluate(policy, train_rows, x_train, y_train, costs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["observations"] = plot_observations(
        rows, candidates, drafter_config.block_size if drafter_config else None, out / "observations.png"
    )
    if args.eval_labels:
        eval_rows = read_jsonl(args.eval_labels)
        report["eval"] = evaluate(
            policy, eval_rows, feature_matrix(eval_rows, args.feature, args.logits_dir),
            best_block_sizes(eval_rows, candidates, args.objective, costs), costs,
        )
        report["eval_observations"] = plot_observations(
            eval_rows, candidates, drafter_config.block_size if drafter_config else None, out / "eval_observations.png"
        )
    report["parameters"] = sum(p.numel() for p in policy.parameters())
    policy.save_pretrained(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k in ("heldout", "eval", "parameters")}, indent=1))
    return policy, report
