"""Training the block policy on collected labels, with an honest held-out evaluation.

Labels come from `training/labels.py`: per prompt, tau at every candidate block size, and with `collect-labels
--copy-tokens N` the same with an N-token copy chain beside the drafter's block and for the chain alone. Each of
these ways to decode is an arm (`configuration.Arm`: `"4"`, `"4+5"`, `"1+5"`); the policy learns to predict tau at
all of them (`modeling_policy.py` decides from the predictions). The best arm of a prompt, against which the policy's
choice is scored, depends on the objective:

* `"tau"` (the paper): argmax of tau, smallest size (and no copy chain) on ties;
* `"throughput"`: argmax of tau(a) / cost(a), where cost(a) is the measured time of one decoding step of arm a
  (target verification + drafter), so a larger block or a copy chain must earn its extra cost. The policy keeps the
  measured cost table (every batch size in it) and decides by it at generate time.

The report compares, on prompts the policy never saw: every fixed arm, the policy, and the per-prompt oracle.

Labels at several temperatures (`collect-labels --temperature`, greedy is 0) train one policy with a tau head per
temperature (`BlockPolicy`): sampled decoding accepts less, so the arm that pays when greedy may not when sampling. A
prompt's rows at all temperatures fall on the same side of the held-out split, and the report scores each temperature
apart (`"heldout"` is greedy's where there are greedy labels, `"heldout_T1"` the labels at temperature 1, ...).
"""

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..configuration import Arm, BlockPolicyConfig, normalized_step_costs, policy_arms
from ..modeling_drafter import DFlashDrafter
from ..modeling_policy import BlockPolicy, decide_for_batch, tau_of
from .data import read_jsonl
from .labels import prefill_logits_file_name


@dataclass
class PolicyTrainingArguments:
    labels: str  # one collect-labels file, or several, comma-separated
    output_dir: str
    eval_labels: str | None = None
    feature: str = "prefill_summary"
    objective: str = "tau"
    candidate_block_sizes: list[int] | None = None
    copy_tokens: int | None = None  # the copy chain the policy may switch on: the labels' (None) or none (0)
    epochs: int = 300
    head_epochs: int = 100  # each further temperature's head, on the frozen trunk
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    hidden_size: int = 256
    num_hidden_layers: int = 2
    dropout: float = 0.1
    heldout_fraction: float = 0.25
    seed: int = 0
    logits_dir: str | None = None
    cost_file: str | None = None


def load_step_costs(path: str) -> dict[int, dict[str, float]]:
    """`{batch size: {arm key: seconds}}` from `blockpilot bench --step-costs` (`Arm.key`: `"4"`, `"4+5"`; a flat
    `{block size: seconds}` file, as earlier versions wrote, is batch 1)."""
    table = json.loads(Path(path).read_text())
    table.pop("device", None)  # see `step_costs_device`
    table.pop("machine", None)  # see `step_costs_machine`
    if table and not any(isinstance(v, dict) for v in table.values()):
        table = {"1": table}
    return {int(n): {Arm.from_key(b).key: float(c) for b, c in costs.items()} for n, costs in table.items()}


def step_costs_device(path: str) -> str | None:
    """The device type a `blockpilot bench --step-costs` file was measured on (`"cpu"`, `"cuda"`, ...), or `None` for
    files written before it was recorded."""
    return json.loads(Path(path).read_text()).get("device")


def step_costs_machine(path: str) -> str | None:
    """The machine a `blockpilot bench --step-costs` file was measured on (`hardware.machine_of`: `"cpu: AMD EPYC,
    avx512_bf16"`), or `None` for files written before it was recorded."""
    return json.loads(Path(path).read_text()).get("machine")


def cost_file_paths(paths: str) -> list[str]:
    """`paths` comma-separated, each folder among them replaced by the tables in it (`bench --step-costs FOLDER`
    writes one per machine), every file once, in the order given."""
    files = []
    for entry in paths.split(","):
        if Path(entry).is_dir():
            tables = [str(p) for p in sorted(Path(entry).glob("*.json")) if not p.name.endswith(".breakdown.json")]
            if not tables:
                raise ValueError(
                    f"{entry} holds no step-cost tables; write one there with `blockpilot bench --step-costs {entry}`."
                )
            files += tables
        else:
            files.append(entry)
    return list(dict.fromkeys(files))


def read_cost_files(paths: str, arms: list[Arm]) -> dict:
    """The `step_costs*` fields of a policy's config from one or more `bench --step-costs` files (`paths`
    comma-separated, `cost_file_paths`): the first is the default table, each further one its machine's own
    (`step_costs_by_machine`)."""
    first, *others = cost_file_paths(paths)
    fields = {
        "step_costs": load_step_costs(first),
        "step_costs_device": step_costs_device(first),
        "step_costs_machine": step_costs_machine(first),
        "step_costs_by_machine": {},
    }
    for path in others:
        machine = step_costs_machine(path)
        if machine is None or machine == fields["step_costs_machine"] or machine in fields["step_costs_by_machine"]:
            raise ValueError(
                f"{path} does not name a machine of its own ({machine!r}): each cost file after the first must come "
                "from `blockpilot bench --step-costs` on another machine (it records which)."
            )
        fields["step_costs_by_machine"][machine] = load_step_costs(path)
    for table in [fields["step_costs"], *fields["step_costs_by_machine"].values()]:
        normalized_step_costs(table, arms)  # every arm costed, or a clear error
    return fields


def read_label_files(paths: str) -> list[dict]:
    """The rows of one or more `collect-labels` files (`paths` comma-separated), e.g. greedy and sampled labels of the
    same prompts."""
    rows = []
    for path in (p.strip() for p in paths.split(",") if p.strip()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"No labels file {path}; make it with `blockpilot collect-labels --out {path}`.")
        rows += read_jsonl(path)
    return rows


def row_temperature(row: dict) -> float:
    """The sampling temperature a label row was collected at (0: greedy, as rows without one are)."""
    return float(row.get("temperature", 0.0))


def greedy_rows_or_all(rows: list[dict]) -> list[dict]:
    """The greedy label rows, or all rows where there are none: the paper's observations are about greedy decoding."""
    return [row for row in rows if row_temperature(row) == 0] or rows


def label_arms(rows: list[dict], candidates: list[int] | None = None, copy_tokens: int | None = None) -> list[Arm]:
    """The arms a policy learns from these labels (`policy_arms`): the block sizes `candidates` (default: all the
    labels hold), and where the labels hold a copy chain (`collect-labels --copy-tokens`) the same with it and the
    chain alone, unless `copy_tokens=0`."""
    available = sorted(set.intersection(*({int(b) for b in row["tau"]} for row in rows)))
    candidates = candidates or available
    missing = [b for b in candidates if b not in available]
    if missing:
        raise ValueError(f"Labels have no tau for block sizes {missing}; recollect with those sizes.")
    copied = {row.get("copy_tokens", 0) for row in rows}
    if copy_tokens is None:
        copy_tokens = max(copied)
    if copy_tokens and copied != {copy_tokens}:
        raise ValueError(
            f"A policy with a {copy_tokens}-token copy chain needs every label row collected with it (`blockpilot "
            f"collect-labels --copy-tokens {copy_tokens}`); these rows have copy chains of {sorted(copied)} tokens."
        )
    return policy_arms(candidates, copy_tokens)


def best_arms(rows: list[dict], arms: list[Arm], objective: str = "tau", costs: dict | None = None) -> list[Arm]:
    """The best arm per row (ties -> the smaller block size, and no copy chain: `ordered_arms`); `Arm(1)` is plain
    decoding, tau 1. `costs`: `{arm key: seconds}`."""
    arms, chosen = ordered_arms(arms), []
    for row in rows:
        scores = [row_tau(row, a) / costs[a.key] if objective == "throughput" else row_tau(row, a) for a in arms]
        best = max(scores)
        chosen.append(next(a for a, score in zip(arms, scores) if score >= best - 1e-12))
    return chosen


def ordered_arms(arms) -> list[Arm]:
    """Plain decoding first, then by copy chain and block size: the order ties are broken in."""
    return sorted(set(arms), key=lambda a: (a.copy_tokens, a.block_size))


def row_tau(row: dict, arm: Arm) -> float:
    if arm == Arm(1):
        return 1.0
    return _labels_of_arm(row, arm, "tau")[str(arm.block_size)]


def row_steps(row: dict, arm: Arm) -> float:
    """Decoding steps the prompt took with `arm`; at block size 1 without copying (plain decoding) one per token."""
    if arm == Arm(1):
        any_size = next(iter(row["tau"]))
        return row["tau"][any_size] * row["steps"][any_size]
    return _labels_of_arm(row, arm, "steps")[str(arm.block_size)]


def _labels_of_arm(row: dict, arm: Arm, name: str) -> dict:
    if not arm.copy_tokens:
        return row[name]
    if row.get("copy_tokens") != arm.copy_tokens:
        raise ValueError(
            f"{row['prompt_id']!r} has no labels with a {arm.copy_tokens}-token copy chain; collect them with "
            f"`blockpilot collect-labels --copy-tokens {arm.copy_tokens}`."
        )
    return row[f"{name}_copy"]


def pooled_tau(rows: list[dict], chosen_arms: list[Arm]) -> float:
    """Mean tokens per decoding step over every step of every prompt, each prompt with its chosen arm."""
    tokens = sum(row_tau(row, a) * row_steps(row, a) for row, a in zip(rows, chosen_arms))
    steps = sum(row_steps(row, a) for row, a in zip(rows, chosen_arms))
    return tokens / max(1, steps)


def pooled_time(rows: list[dict], chosen_arms: list[Arm], costs: dict) -> float:
    """Estimated decoding seconds: steps x measured step cost of the chosen arm (`costs`: `{arm key: seconds}`)."""
    return sum(row_steps(row, a) * costs[a.key] for row, a in zip(rows, chosen_arms))


def feature_matrix(rows: list[dict], feature: str, logits_dir: str | None = None) -> torch.Tensor:
    if feature == "prefill_summary":
        return torch.tensor([row["summary_features"] for row in rows], dtype=torch.float32)
    if logits_dir is None:
        raise ValueError("The prefill_distribution feature needs --logits-dir (collect-labels --logits-dir).")

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
    """`(train, held out)` by prompt: a prompt labelled at several temperatures is held out at all of them."""
    prompt_ids = sorted({r["prompt_id"] for r in rows})
    random.Random(seed).shuffle(prompt_ids)
    heldout = set(prompt_ids[: max(1, int(round(heldout_fraction * len(prompt_ids))))])
    order = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    rows = sorted(rows, key=lambda r: (order[r["prompt_id"]], row_temperature(r)))
    return [r for r in rows if r["prompt_id"] not in heldout], [r for r in rows if r["prompt_id"] in heldout]


def tau_matrix(rows: list[dict], arms: list[Arm]) -> torch.Tensor:
    """Measured tau, `(prompts, arms)`: the regression targets."""
    return torch.tensor([[row_tau(row, a) for a in arms] for row in rows], dtype=torch.float32)


def fit_policy(
    config: BlockPolicyConfig,
    features: torch.Tensor,
    taus: torch.Tensor,
    args: PolicyTrainingArguments,
    temperatures: torch.Tensor | None = None,
) -> BlockPolicy:
    """Full-batch AdamW on standardised features: squared error of log tau at every arm (the choice compares tau
    between arms and against costs, so relative errors are what matter).

    With labels at several temperatures (`temperatures`, one per row; `config.label_temperatures`), the policy of the
    first temperature is trained on its rows exactly as a policy of that temperature alone; then each other
    temperature's head, started from the first one's, on its own rows over the frozen trunk."""
    temperatures = torch.zeros(len(features)) if temperatures is None else temperatures
    first, *others = config.label_temperatures
    base_config = copy.deepcopy(config)
    base_config.label_temperatures = [first]
    rows = temperatures == first
    torch.manual_seed(args.seed)
    policy = BlockPolicy(base_config)
    policy.feature_mean.copy_(features[rows].mean(0))
    std = features[rows].std(0).clamp(min=1e-4) if int(rows.sum()) > 1 else torch.ones(features.shape[1])
    policy.feature_std.copy_(std)
    _fit(policy, policy.parameters(), lambda: policy(features[rows]), taus[rows], args)
    if not others:
        return policy.eval()
    trained, policy = policy, BlockPolicy(config)
    missing = policy.load_state_dict(trained.state_dict(), strict=False).missing_keys
    assert all(key.startswith("temperature_heads.") for key in missing), missing
    with torch.no_grad():
        hidden = policy.eval().trunk(features)
    for temperature, head in zip(others, policy.temperature_heads):
        head.load_state_dict(policy.tau_head.state_dict())
        rows = temperatures == temperature
        _fit(head, head.parameters(), lambda: tau_of(head(hidden[rows])), taus[rows], args, args.head_epochs)
    return policy.eval()


def _fit(module, parameters, predict, taus: torch.Tensor, args: PolicyTrainingArguments, epochs=None) -> None:
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    module.train()
    for _ in range(args.epochs if epochs is None else epochs):
        loss = F.mse_loss(predict().log(), taus.log())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def evaluate(
    policy: BlockPolicy, rows: list[dict], features: torch.Tensor, best: list[Arm], costs: dict | None
) -> dict:
    """On `rows`: how well the policy predicts tau, how often it picks the best arm (`best`), and the tau (and, with
    batch-1 `costs`, estimated time) of its choices vs every fixed arm vs the per-prompt oracle. `batch_choices` shows
    what it picks for consecutive rows decoded as one batch, at each batch size of its cost table."""
    arms = policy.config.arms
    with torch.no_grad():
        predicted_tau = policy(features, torch.tensor([row_temperature(row) for row in rows]))
    tau_errors = (predicted_tau - tau_matrix(rows, arms)).abs().mean(0)
    batch1_costs = policy.step_costs_for(1)
    chosen = [
        Arm(int(sizes), copy) for sizes, copy in (decide_for_batch(t[None], arms, batch1_costs) for t in predicted_tau)
    ]
    shown = ordered_arms([*arms, *chosen, *best, *([Arm(1)] if costs and "1" in costs else [])])
    oracle = best_arms(rows, arms)
    report = {
        "prompts": len(rows),
        "accuracy": sum(c == b for c, b in zip(chosen, best)) / max(1, len(rows)),
        "tau_abs_error": {a.key: e for a, e in zip(arms, tau_errors.tolist())},
        "tau_policy": pooled_tau(rows, chosen),
        "tau_oracle": pooled_tau(rows, oracle),
        "tau_fixed": {a.key: pooled_tau(rows, [a] * len(rows)) for a in arms},
        "chosen_histogram": {a.key: chosen.count(a) for a in shown},
        "oracle_histogram": {a.key: oracle.count(a) for a in ordered_arms(arms)},
        "batch_choices": {},
    }
    for batch_size in sorted(int(n) for n in policy.config.step_costs or {}):
        batch_costs = policy.step_costs_for(batch_size)
        picked = []
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            sizes, copy = decide_for_batch(predicted_tau[start : start + batch_size], arms, batch_costs)
            picked += [Arm(size, copy) for size in sizes.tolist()]
        report["batch_choices"][str(batch_size)] = {a.key: picked.count(a) for a in ordered_arms(picked)}
    best_fixed = max(ordered_arms(arms), key=lambda a: report["tau_fixed"][a.key])
    report["best_fixed_arm"] = best_fixed.key
    report["policy_vs_best_fixed"] = report["tau_policy"] / report["tau_fixed"][best_fixed.key]
    report["policy_vs_oracle"] = report["tau_policy"] / report["tau_oracle"]
    if costs is not None:
        costed = [a for a in shown if a.key in costs]
        report["time_policy_s"] = pooled_time(rows, chosen, costs)
        report["time_fixed_s"] = {a.key: pooled_time(rows, [a] * len(rows), costs) for a in costed}
        time_oracle = [min(costed, key=lambda a: row_steps(row, a) * costs[a.key]) for row in rows]
        report["time_oracle_s"] = pooled_time(rows, time_oracle, costs)
    return report


def plot_observations(rows: list[dict], candidates: list[int], training_block_size: int | None, out_png: Path) -> dict:
    """The paper's two observations on our pair: how often the best size differs from the training size, and how
    concentrated it is around it; plus tau-vs-block-size curves (the PNG needs matplotlib, the numbers do not)."""
    best = [arm.block_size for arm in best_arms(rows, [Arm(b) for b in candidates])]
    stats = {"best_histogram": {str(b): best.count(b) for b in candidates}}
    if training_block_size is not None:
        stats["fraction_best_differs_from_training_size"] = sum(b != training_block_size for b in best) / max(
            1, len(best)
        )
        stats["fraction_within_1_of_training_size"] = sum(abs(b - training_block_size) <= 1 for b in best) / max(
            1, len(best)
        )
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
    axes[0].plot(
        candidates,
        [pooled_tau(rows, [Arm(b)] * len(rows)) for b in candidates],
        "o-",
        color="C0",
        lw=2,
        label="pooled",
    )
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


def train_policy_from_files(
    args: PolicyTrainingArguments, target_name: str | None = None, drafter_path: str | None = None
):
    """Train on `args.labels` (minus a held-out split), report on the held-out split and on `args.eval_labels`, at
    each temperature the labels hold."""

    rows = read_label_files(args.labels)
    prompts = len({r["prompt_id"] for r in rows})
    if prompts < 4:
        raise ValueError(
            f"{args.labels} has {prompts} labelled prompts; collect more with `blockpilot collect-labels`."
        )
    arms = label_arms(rows, args.candidate_block_sizes, args.copy_tokens)
    candidates = sorted({a.block_size for a in arms if not a.copy_tokens})
    copy_tokens = max(a.copy_tokens for a in arms)
    cost_fields, costs, scored_arms = {}, None, arms
    if args.cost_file:
        cost_fields = read_cost_files(args.cost_file, arms)
        if 1 not in cost_fields["step_costs"]:
            raise ValueError(
                f"{cost_file_paths(args.cost_file)[0]} has no step costs at batch size 1; measure them with "
                "`blockpilot bench --step-costs ... --batch-sizes 1,...`."
            )
        costs = cost_fields["step_costs"][1]  # the labels are single-sequence decodes
        scored_arms = ordered_arms([*arms, *([Arm(1)] if "1" in costs else [])])
    if args.objective == "throughput" and costs is None:
        raise ValueError("--objective throughput needs --cost-file (step costs from `blockpilot bench --step-costs`).")
    drafter_config = DFlashDrafter.config_class.from_pretrained(drafter_path) if drafter_path else None

    train_rows, heldout_rows = split_rows(rows, args.heldout_fraction, args.seed)
    x_train = feature_matrix(train_rows, args.feature, args.logits_dir)
    hidden = len(rows[0]["summary_features"]) - 4
    vocab = drafter_config.target_vocab_size if drafter_config is not None else None
    config = BlockPolicyConfig(
        candidate_block_sizes=candidates,
        copy_tokens=copy_tokens,
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
        **(cost_fields if args.objective == "throughput" else {}),
        label_temperatures=sorted({row_temperature(r) for r in train_rows}),
    )
    temperatures = torch.tensor([row_temperature(r) for r in train_rows])
    policy = fit_policy(config, x_train, tau_matrix(train_rows, arms), args, temperatures)
    report = {"args": asdict(args), "train_prompts": len({r["prompt_id"] for r in train_rows})}

    def report_on(name: str, part: list[dict]) -> None:
        # One score per temperature: the best arm at one temperature is not the best at another.
        for temperature in sorted({row_temperature(r) for r in part}):
            subset = [r for r in part if row_temperature(r) == temperature]
            key = name if temperature == 0 else f"{name}_T{temperature:g}"
            report[key] = evaluate(
                policy,
                subset,
                feature_matrix(subset, args.feature, args.logits_dir),
                best_arms(subset, scored_arms, args.objective, costs),
                costs,
            )

    report_on("heldout", heldout_rows)
    report_on("train", train_rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["observations"] = plot_observations(
        greedy_rows_or_all(rows),
        candidates,
        drafter_config.block_size if drafter_config else None,
        out / "observations.png",
    )
    if args.eval_labels:
        eval_rows = read_label_files(args.eval_labels)
        report_on("eval", eval_rows)
        report["eval_observations"] = plot_observations(
            greedy_rows_or_all(eval_rows),
            candidates,
            drafter_config.block_size if drafter_config else None,
            out / "eval_observations.png",
        )
    report["parameters"] = sum(p.numel() for p in policy.parameters())
    policy.save_pretrained(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    shown = [k for k in report if k.split("_T")[0] in ("heldout", "eval")] + ["parameters"]
    print(json.dumps({k: report[k] for k in shown}, indent=1))
    return policy, report
