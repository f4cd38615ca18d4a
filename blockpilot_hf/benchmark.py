"""The one benchmark: every decoding method side by side, on the same prompts, interleaved, at each batch size.

Methods (`--methods`, comma separated) are the keys of `METHODS`, each with what it runs.
With `--batch-sizes 1,4,16` prompts are grouped into left-padded batches of each size and every method runs on the
same batches; per-prompt times are the batch's time shared equally among its rows.
The per-prompt oracle (best fixed size per prompt, by tau and by time) is derived from the `fixed` sweep.

For every prompt the methods run back to back (interleaved), after a warm-up of every method on the first prompt.
Times are CUDA-event device times on a GPU and wall-clock times on CPU; "decode" time subtracts a separately timed
prefill forward.
Runs under `accelerate launch -m blockpilot_hf.cli bench ...`: prompts are split across processes, results gathered
on the main process, de-duplicated by prompt id, and written once (JSON, Markdown, PNG).
"""

import json
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .compat import cache_kwargs, has_native_dflash, new_static_cache
from .cpu_linear import MeasuredLinear, PackedLinear, WeightMajorLinear
from .decoding import DecodingWorkspace, cache_capacity, resolve_backend
from .decoding.requests import cut_at_eos, eos_token_ids, pad_token_id
from .hardware import cpu_description, machine_file_name, machine_of
from .configuration import Arm
from .features import PrefillRepresentation
from .loading import (
    DTYPES,
    add_drafter_dtype_argument,
    comma_separated_ints,
    load_drafter_and_policy,
    load_prompts,
    load_target,
)
from .metrics import acceptance_metrics, mean_tau
from .training.data import chat_prompt_ids, left_pad

METHODS = {
    "plain": "target.generate alone (the reference; greedy outputs of every other method are checked against it)",
    "plain_static": "target.generate with a static cache (transformers compiles its forward on CUDA): the GPU baseline",
    "plain_weight_major": "target.generate with few-row products run weight-major (cpu_linear.WeightMajorLinear; CPU)",
    "plain_packed": "target.generate with every product oneDNN-packed (cpu_linear.PackedLinear; CPU)",
    "plain_measured": "target.generate with each product packed or not as this machine timed faster "
    "(cpu_linear.MeasuredLinear; CPU): the CPU baseline, plain decoding in the product form our CPU steps use",
    "prompt_lookup": "transformers' prompt-lookup decoding (prompt_lookup_num_tokens=--copy-tokens; batch 1 only)",
    "native_dflash": "transformers' own DFlash path with our drafter (speculation_type='dflash'), where available",
    "fixed": "our decoder at every size in --block-sizes (CUDA graphs on a GPU)",
    "copy": "our decoder with the copy chain alone (block size 1, prompt_lookup_num_tokens=--copy-tokens)",
    "fixed_copy": "our decoder at every size in --block-sizes with the copy chain beside the drafter's (--copy-tokens)",
    "fixed_eager": "the same with decoding_backend='eager', to show what graph replay buys",
    "policy": "our decoder with the learned block policy",
}
# What speed-ups are given against, where run: plain `generate`, the GPU's and the CPU's best plain decoders.
BASELINES = ("plain", "plain_static", "plain_measured")
_PLAIN_FORMS = {
    "plain_weight_major": WeightMajorLinear,
    "plain_packed": PackedLinear,
    "plain_measured": MeasuredLinear,
}


def add_arguments(p):
    p.add_argument("--prompts", default="humaneval", help="'humaneval' or a JSONL of {'prompt': ...}")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--methods",
        default="plain,fixed,policy",
        help="comma separated: " + "; ".join(f"{name}: {what}" for name, what in METHODS.items()),
    )
    p.add_argument("--block-sizes", type=comma_separated_ints, default="2,4,8,16", help="for fixed and --step-costs")
    p.add_argument(
        "--copy-tokens",
        type=int,
        default=5,
        help="copy-chain length of the copy and fixed_copy methods, and of the copy arms --step-costs measures (0: none)",
    )
    p.add_argument("--drafter", default=None)
    p.add_argument("--policy", default=None)
    add_drafter_dtype_argument(p)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument(
        "--batch-sizes",
        type=comma_separated_ints,
        default="1",
        help="comma separated; each runs every method on batches of that size",
    )
    p.add_argument(
        "--step-costs",
        default=None,
        help="only measure seconds per decoding step at each batch size and block size, with and without the copy chain (and of a plain step), write JSON here (into an existing folder: as this machine's table, named after it)",
    )
    p.add_argument("--repeats", type=int, default=10, help="with --step-costs: timed rounds per step (median kept)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """Run `fn` and return `(result, seconds)`: CUDA events on a GPU (device time, no host jitter), else a
    wall-clock timer."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_method(
    target, drafter, policy, ids, attention_mask, method: str, block_size, max_new_tokens, temperature, copy_tokens=5
):
    """One batched generation with `method`; returns (sequences, per-row acceptance lengths or None, per-row block
    sizes or None, the copy chain's length or None)."""
    sampling = {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else None}
    common = dict(
        attention_mask=attention_mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **sampling
    )
    if method == "plain":
        return target.generate(ids, **common).sequences, None, None, None
    if method in _PLAIN_FORMS:
        with _PLAIN_FORMS[method]():
            return target.generate(ids, **common).sequences, None, None, None
    if method == "plain_static":
        # A static cache of a bucketed size, so transformers compiles its decoding step once, not once per length.

        cache = new_static_cache(target.config, cache_capacity(ids.shape[1], max_new_tokens, 0, 1))
        return target.generate(ids, **cache_kwargs(target, cache), **common).sequences, None, None, None
    if method == "prompt_lookup":
        return target.generate(ids, prompt_lookup_num_tokens=copy_tokens, **common).sequences, None, None, None
    if method == "native_dflash":
        out = target.generate(ids, assistant_model=drafter, speculation_type="dflash", **common)
        return out.sequences, None, None, None
    choice = {"policy": policy, "copy": 1}.get(method, block_size)
    backend = "eager" if method == "fixed_eager" else "auto"
    if method in ("copy", "fixed_copy"):
        common["prompt_lookup_num_tokens"] = copy_tokens
    out = target.generate(ids, assistant_model=drafter, block_policy=choice, decoding_backend=backend, **common)
    return out.sequences, out.acceptance_lengths, out.block_sizes, out.copy_tokens


def method_list(args, drafter, policy) -> list[tuple[str, int | None]]:

    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    methods = []
    for name in args.methods.split(","):
        if name in ("fixed", "fixed_eager", "fixed_copy"):
            methods += [(name, b) for b in args.block_sizes]
        elif name == "policy":
            if policy is not None:
                methods.append(("policy", None))
        elif name == "native_dflash":
            if has_native_dflash() and drafter is not None:
                methods.append(("native_dflash", None))
        else:
            methods.append((name, None))
    return methods


def summarize(records: list[dict]) -> dict:
    """Per method: tokens/s, time per output token (end to end and decode only), tau with histogram, pairwise speedup
    against plain, greedy identity; plus the per-prompt oracle over the fixed sweep."""
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], {})[r["label"]] = r
    labels = sorted({r["label"] for r in records}, key=lambda x: (x != "plain", x))
    # Oracle: for each prompt, the fixed size with the best tau (ties -> smaller block), and the fastest one.
    for runs in by_prompt.values():
        fixed = [r for r in runs.values() if r["method"] == "fixed"]  # the oracle picks among graph-replayed runs
        if fixed:
            best_tau = max(fixed, key=lambda r: (r["tau"], -r["block_size"]))
            fastest = min(fixed, key=lambda r: r["seconds"])
            runs["oracle_tau"] = {**best_tau, "label": "oracle_tau", "method": "oracle_tau"}
            runs["oracle_time"] = {**fastest, "label": "oracle_time", "method": "oracle_time"}
    if any("oracle_tau" in runs for runs in by_prompt.values()):
        labels += ["oracle_tau", "oracle_time"]
    summary = {}
    for label in labels:
        runs = [runs[label] for runs in by_prompt.values() if label in runs]
        tokens = sum(r["new_tokens"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        decode = sum(max(r["seconds"] - r["prefill_seconds"], 1e-9) for r in runs)
        entry = {
            "prompts": len(runs),
            "new_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else None,
            "ms_per_token": 1000 * seconds / max(1, tokens),
            "decode_ms_per_token": 1000 * decode / max(1, tokens),
        }
        acceptance = [r["acceptance_lengths"] for r in runs if r["acceptance_lengths"]]
        if acceptance:
            metrics = acceptance_metrics(acceptance)
            entry["tau"] = metrics["mean_tau"]
            entry["tau_histogram"] = metrics["histogram"]
            entry["block_sizes"] = dict(sorted(Counter(r["block_size"] for r in runs).items()))
            # what each sequence ran: its block size, and the copy chain beside it (`Arm.key`: "4", "4+5")
            entry["arms"] = dict(Counter(Arm(r["block_size"], r.get("copy_tokens") or 0).key for r in runs))
        # Speed-ups against each plain baseline present; identity against eager plain, else the static one.
        for reference in BASELINES:
            pairs = [(by_prompt[r["prompt_id"]].get(reference), r) for r in runs]
            pairs = [(p, r) for p, r in pairs if p is not None]
            if pairs and label != reference:
                reference_ms = sum(p["seconds"] / max(1, p["new_tokens"]) for p, _ in pairs)
                our_ms = sum(r["seconds"] / max(1, r["new_tokens"]) for _, r in pairs)
                entry[f"speedup_vs_{reference}"] = reference_ms / our_ms
                entry.setdefault("identical_to_plain", sum(p["tokens"] == r["tokens"] for p, r in pairs) / len(pairs))
        summary[label] = entry
    return summary


def markdown_table(summary: dict, meta: dict) -> str:
    references = [r for r in BASELINES if r in summary]  # the baselines that ran
    lines = [
        f"Target `{meta['target']}`, {meta['device']}, {meta['dtype']} (drafter {meta.get('drafter_dtype')}), "
        f"{meta['prompts']} prompts ({meta['dataset']}), "
        f"max_new_tokens {meta['max_new_tokens']}, temperature {meta['temperature']}, batch {meta.get('batch_size', 1)}.",
        "",
        "| method | tokens/s | ms/token | decode ms/token | mean tau | "
        + "".join(f"speedup vs {reference} | " for reference in references)
        + "identical to plain |",
        "|---|---|---|---|---|" + "---|" * len(references) + "---|",
    ]
    for label, e in summary.items():
        tau = f"{e['tau']:.2f}" if "tau" in e else "-"
        speeds = "".join(f"{e[f'speedup_vs_{r}']:.2f}x | " if f"speedup_vs_{r}" in e else "- | " for r in references)
        same = f"{100 * e['identical_to_plain']:.0f}%" if "identical_to_plain" in e else "-"
        lines.append(
            f"| {label} | {e['tokens_per_s']:.1f} | {e['ms_per_token']:.1f} | {e['decode_ms_per_token']:.1f} | {tau} | "
            f"{speeds}{same} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = sorted(
        (int(k.split("=")[1].split("+")[0]), k, v) for k, v in summary.items() if k.startswith("fixed=") and "tau" in v
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if fixed:
        for copied, name in ((False, "fixed block size"), (True, "fixed block size + copy chain")):
            points = [(b, v["tau"]) for b, k, v in fixed if ("+copy=" in k) == copied]
            if points:
                axes[0].plot(*zip(*points), "o-", label=name)
        for label, style in (("policy", "r*"), ("oracle_tau", "g^")):
            if label in summary and "tau" in summary[label]:
                sizes = summary[label]["block_sizes"]
                mean_b = sum(int(b) * n for b, n in sizes.items()) / sum(sizes.values())
                axes[0].plot([mean_b], [summary[label]["tau"]], style, markersize=12, label=f"{label} (mean b)")
        axes[0].set_xlabel("block size")
        axes[0].set_ylabel("mean tau (tokens per target forward)")
        axes[0].legend()
        axes[0].set_title("acceptance vs block size")
    labels = [k for k in summary if k != "plain"]
    axes[1].barh(labels, [summary[k].get("speedup_vs_plain", 0) for k in labels])
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("speedup vs plain generate (time per token)")
    axes[1].set_title("speed")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


@torch.no_grad()
def measure_step_breakdown(
    target,
    drafter,
    block_sizes: list[int],
    batch_sizes: list[int] = (1,),
    context_length: int = 256,
    repeats: int = 10,
    policy=None,
    decoding_backend: str = "auto",
    copy_tokens: int = 0,
) -> dict:
    """Median seconds of each part of a decoding step, per batch size and block size, at a fixed context length:
    `draft` (one drafter forward), `verify` (one target forward over the block) and `plain` (one target forward over
    one token per row: a plain decoding step with the same static cache and graph replay), plus the policy's cost per
    request. With `copy_tokens`, also every block size (and block size 1: the copy chain alone) verified with that
    many copied tokens beside it (`copy`). The cost model of a step; end-to-end times in the benchmark show what the
    host adds on top (the copy proposer's lookups among it)."""

    device = target.device
    use_graphs = resolve_backend(decoding_backend, device)
    breakdown = {"context_length": context_length, "backend": "cuda_graphs" if use_graphs else "eager", "batch": {}}
    for batch_size in batch_sizes:
        ids = torch.randint(100, 1000, (batch_size, context_length), device=device)
        positions = torch.arange(context_length, device=device).expand(batch_size, -1)
        longest = max(block_sizes) + copy_tokens
        capacity = cache_capacity(context_length, 2 * longest, drafter.config.max_block_size + copy_tokens, batch_size)
        workspace = DecodingWorkspace(target, drafter, batch_size, capacity, use_graphs)
        workspace.reset(torch.ones_like(ids, dtype=torch.bool))
        last_logits, features, last_hidden = workspace.prefill(ids, positions, drafter.config.target_layer_ids)
        steps, sizes = {}, sorted(set(block_sizes) | {1})
        arms = [(b, 0) for b in sizes] + ([(b, copy_tokens) for b in sizes] if copy_tokens else [])
        for block_size, copied in arms:
            verify, draft = workspace.steps(block_size, copied)
            length = verify.tree.length  # the block and its copied tokens
            verify.block_ids.copy_(ids[:, -length:])
            verify.position_ids.copy_(positions[:, -length:] + length)
            verify.place(context_length)
            draft.anchor_ids.copy_(ids[:, -1:])
            draft.anchor_positions.fill_(context_length)
            draft.context.copy_(features[:, -length:])
            draft.context_positions.copy_(positions[:, -length:])
            draft.place(context_length - length, length)
            parts = {"verify": verify, "draft": draft} if block_size > 1 else {"verify": verify}
            steps[block_size, copied] = parts
        # Rounds over every step in turn, so that drift in the machine's speed (turbo, other load) reaches all block
        # sizes alike and cannot rank them; the first two rounds warm up (and capture graphs, pick linear forms).
        times = {b: {part: [] for part in parts} for b, parts in steps.items()}
        for _ in range(repeats + 2):
            for (block_size, copied), parts in steps.items():
                workspace.row_block_sizes.fill_(block_size)
                for part, step in parts.items():
                    times[block_size, copied][part].append(_timed(step, device)[1])
                    workspace.slot_valid[:, context_length:] = False  # forget the block a verify step marked valid
        per_block = {
            b: {part: sorted(t[2:])[len(t[2:]) // 2] for part, t in parts.items()} for b, parts in times.items()
        }
        costs = {"plain": per_block[1, 0]["verify"], "blocks": {b: per_block[b, 0] for b in block_sizes}}
        if copy_tokens:
            costs["copy_tokens"] = copy_tokens
            costs["copy"] = {b: per_block[b, copy_tokens] for b in sizes}
        if policy is not None:
            prefill = PrefillRepresentation(
                last_logits, last_hidden, torch.full((batch_size,), context_length, device=device)
            )
            costs["policy"] = _timed(lambda: policy.choose_block_sizes(prefill), device)[1]
        breakdown["batch"][batch_size] = costs
    return breakdown


def step_cost_table(breakdown: dict) -> dict[int, dict[str, float]]:
    """`{batch size: {arm key: seconds}}` from a step breakdown: draft + verify per block size (`"4"`), the same with
    the copy chain (`"4+5"`, and `"1+5"`: the chain alone) where measured, and `"1"` (a plain step, no drafter). The
    `--cost-file` of `blockpilot train-policy`, kept in the policy's config."""

    def step(parts: dict) -> float:
        return parts["verify"] + parts.get("draft", 0.0)

    table = {}
    for batch_size, costs in breakdown["batch"].items():
        row = {"1": costs["plain"], **{Arm(int(b)).key: step(e) for b, e in costs["blocks"].items()}}
        for b, e in costs.get("copy", {}).items():
            row[Arm(int(b), costs["copy_tokens"]).key] = step(e)
        table[batch_size] = row
    return table


def measure_step_costs(target, drafter, block_sizes: list[int], *args, **kwargs) -> dict[int, dict[str, float]]:
    """Seconds of one decoding step at each batch size and block size (`step_cost_table`); the arguments are
    `measure_step_breakdown`'s."""
    return step_cost_table(measure_step_breakdown(target, drafter, block_sizes, *args, **kwargs))


@torch.no_grad()
def main(args):

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU-only launches do not split work
    target, tokenizer = load_target(args.target, DTYPES[args.dtype], args.device or state.device)
    drafter, policy = load_drafter_and_policy(args, target)
    if args.step_costs:
        breakdown = measure_step_breakdown(
            target,
            drafter,
            args.block_sizes,
            args.batch_sizes,
            repeats=args.repeats,
            policy=policy,
            copy_tokens=args.copy_tokens,
        )
        costs = step_cost_table(breakdown)
        # The --cost-file format of train-policy, with the device type and the machine the costs hold for
        # (`step_costs_device`, `step_costs_machine`).
        where = {"device": target.device.type, "machine": machine_of(target.device)}
        path = Path(args.step_costs)
        if path.is_dir():  # a folder of tables, one per machine
            path = path / machine_file_name(where["machine"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**where, **costs}, indent=1))
        path.with_suffix(".breakdown.json").write_text(json.dumps(breakdown, indent=1))
        print(json.dumps(breakdown, indent=1))
        return costs
    methods = method_list(args, drafter, policy)
    prompts = load_prompts(args.prompts, args.limit, args.seed)
    device = target.device
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(target.generation_config)

    def measure(rows, seed):
        prompt_ids = [chat_prompt_ids(tokenizer, row["prompt"]) for row in rows]
        ids, mask = left_pad(prompt_ids, pad_id, device)
        width = ids.shape[1]
        _, prefill_seconds = _timed(lambda: target(input_ids=ids, attention_mask=mask, logits_to_keep=1), device)
        results = []
        for method, block_size in methods:
            torch.manual_seed(seed)
            (seq, steps, used, copied), seconds = _timed(
                lambda: run_method(
                    target,
                    drafter,
                    policy,
                    ids,
                    mask,
                    method,
                    block_size,
                    args.max_new_tokens,
                    args.temperature,
                    args.copy_tokens,
                ),
                device,
            )
            label = f"{method}={block_size}" if method in ("fixed", "fixed_eager") else method
            if method in ("copy", "fixed_copy"):
                label = f"fixed={block_size}+copy={args.copy_tokens}" if block_size else f"copy={args.copy_tokens}"
            for i, row in enumerate(rows):
                tokens = cut_at_eos(seq[i, width:].tolist(), eos_ids)
                results.append(
                    {
                        "prompt_id": row["prompt_id"],
                        "method": method,
                        "label": label,
                        "batch_size": len(rows),
                        "block_size": used[i] if used else None,
                        "copy_tokens": copied,
                        "new_tokens": len(tokens),
                        # the batch's time, shared equally among its rows
                        "seconds": seconds / len(rows),
                        "prefill_seconds": prefill_seconds / len(rows),
                        "tau": mean_tau(steps[i]) if steps else None,
                        "acceptance_lengths": steps[i] if steps else None,
                        "tokens": tokens,
                    }
                )
        return results

    summaries = {}
    for batch_size in args.batch_sizes:
        batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        if batches:
            measure(batches[0], args.seed)  # warm-up: allocator, kernels, lazy inits, graph capture; not recorded
        records = []
        with state.split_between_processes(batches, apply_padding=True) as mine:
            for i, rows in enumerate(
                tqdm(mine, desc=f"benchmark, batch {batch_size}", disable=not state.is_main_process)
            ):
                records.extend(measure(rows, args.seed + i))
        records = gather_object(records)
        if not state.is_main_process:
            continue
        seen, unique = set(), []
        for r in records:  # apply_padding repeats the last batches on some ranks
            if (r["prompt_id"], r["label"]) not in seen:
                seen.add((r["prompt_id"], r["label"]))
                unique.append(r)
        summaries[batch_size] = (summarize(unique), unique)
    if not state.is_main_process:
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for batch_size, (summary, unique) in summaries.items():
        meta = {
            "target": args.target,
            "dataset": args.prompts,
            "prompts": len({r["prompt_id"] for r in unique}),
            "batch_size": batch_size,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "dtype": args.dtype,
            "drafter_dtype": str(drafter.dtype).removeprefix("torch.") if drafter is not None else None,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({cpu_description()}, {torch.get_num_threads()} threads)",
            "processes": state.num_processes,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "methods": [m for m, _ in methods],
            "block_sizes": ",".join(map(str, args.block_sizes)),  # as given on the command line
        }
        tag = (f"_{args.tag}" if args.tag else "") + (f"_batch{batch_size}" if batch_size != 1 else "")
        (out / f"results{tag}.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "records": unique}, indent=1)
        )
        table = markdown_table(summary, meta)
        (out / f"results{tag}.md").write_text(table)
        try:
            plot(summary, out / f"results{tag}.png")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install blockpilot-hf[bench])")
        print(table)
    return summaries[next(iter(summaries))][0] if len(summaries) == 1 else {b: s for b, (s, _) in summaries.items()}
