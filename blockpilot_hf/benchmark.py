"""The one benchmark: every decoding method side by side, on the same prompts, interleaved, batch 1.

Methods (`--methods`, comma separated):
    plain          target.generate alone (the reference; greedy outputs of every other method are checked against it)
    prompt_lookup  transformers' prompt-lookup decoding (prompt_lookup_num_tokens=10)
    native_dflash  transformers' own DFlash path with our drafter (speculation_type="dflash"), where available
    fixed          our decoder at every size in --block-sizes
    policy         our decoder with the learned block policy
The per-prompt oracle (best fixed size per prompt, by tau and by time) is derived from the `fixed` sweep.

For every prompt the methods run back to back (interleaved), after a warm-up of every method on the first prompt.
Times are CUDA-event device times on a GPU and wall-clock times on CPU; "decode" time subtracts a separately timed
prefill forward.
Runs under `accelerate launch -m blockpilot_hf.cli bench ...`: prompts are split across processes, results gathered
on the main process, de-duplicated by prompt id, and written once (JSON, Markdown, PNG).
"""

import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .metrics import acceptance_metrics, mean_tau


def add_arguments(p):
    p.add_argument("--prompts", default="humaneval", help="'humaneval' or a JSONL of {'prompt': ...}")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--methods", default="plain,prompt_lookup,native_dflash,fixed,policy")
    p.add_argument("--block-sizes", default="4,8,12,14,15,16,17,18,20")
    p.add_argument("--drafter", default=None)
    p.add_argument("--policy", default=None)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--step-costs", default=None, help="only measure seconds per decoding step at each block size, write JSON here")


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


def run_method(target, drafter, policy, ids, method: str, block_size, max_new_tokens, temperature):
    """One generation with `method`; returns (sequences, acceptance lengths or None, block size used or None)."""
    sampling = {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else None}
    common = dict(max_new_tokens=max_new_tokens, return_dict_in_generate=True, **sampling)
    if method == "plain":
        return target.generate(ids, **common).sequences, None, None
    if method == "prompt_lookup":
        return target.generate(ids, prompt_lookup_num_tokens=10, **common).sequences, None, None
    if method == "native_dflash":
        return target.generate(ids, assistant_model=drafter, speculation_type="dflash", **common).sequences, None, None
    choice = policy if method == "policy" else block_size
    out = target.generate(ids, assistant_model=drafter, block_policy=choice, **common)
    return out.sequences, out.acceptance_lengths[0], out.block_sizes[0]


def method_list(args, drafter, policy) -> list[tuple[str, int | None]]:
    from .compat import has_native_dflash

    methods = []
    for name in args.methods.split(","):
        if name == "fixed":
            methods += [("fixed", int(b)) for b in args.block_sizes.split(",")]
        elif name == "policy":
            if policy is not None:
                methods.append(("policy", None))
        elif name == "native_dflash":
            if has_native_dflash() and drafter is not None:
                methods.append(("native_dflash", None))
        elif name in ("plain", "prompt_lookup"):
            methods.append((name, None))
        else:
            raise ValueError(f"Unknown method {name!r}.")
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
        fixed = [r for r in runs.values() if r["method"] == "fixed"]
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
        plains = [by_prompt[r["prompt_id"]].get("plain") for r in runs]
        pairs = [(p, r) for p, r in zip(plains, runs) if p is not None]
        if pairs and label != "plain":
            plain_ms = sum(p["seconds"] / max(1, p["new_tokens"]) for p, _ in pairs)
            our_ms = sum(r["seconds"] / max(1, r["new_tokens"]) for _, r in pairs)
            entry["speedup_vs_plain"] = plain_ms / our_ms
            entry["identical_to_plain"] = sum(p["tokens"] == r["tokens"] for p, r in pairs) / len(pairs)
        summary[label] = entry
    return summary


def markdown_table(summary: dict, meta: dict) -> str:
    lines = [
        f"Target `{meta['target']}`, {meta['device']}, {meta['dtype']}, {meta['prompts']} prompts ({meta['dataset']}), "
        f"max_new_tokens {meta['max_new_tokens']}, temperature {meta['temperature']}, batch 1.",
        "",
        "| method | tokens/s | ms/token | decode ms/token | mean tau | speedup vs plain | identical to plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e in summary.items():
        tau = f"{e['tau']:.2f}" if "tau" in e else "-"
        speed = f"{e['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in e else "1.00x"
        same = f"{100 * e['identical_to_plain']:.0f}%" if "identical_to_plain" in e else "-"
        lines.append(
            f"| {label} | {e['tokens_per_s']:.1f} | {e['ms_per_token']:.1f} | {e['decode_ms_per_token']:.1f} | {tau} | "
            f"{speed} | {same} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = sorted((int(k.split("=")[1]), v) for k, v in summary.items() if k.startswith("fixed=") and "tau" in v)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if fixed:
        axes[0].plot([b for b, _ in fixed], [v["tau"] for _, v in fixed], "o-", label="fixed block size")
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
def measure_step_costs(target, drafter, block_sizes: list[int], context_length: int = 256, repeats: int = 10) -> dict:
    """Seconds of one decoding step (drafter proposal + target verification of the block) at each block size, at a
    fixed context length: the cost side of the throughput objective and of "where the time goes"."""
    from .compat import cache_kwargs, crop_cache, new_dynamic_cache
    from .decoding import BlockPilotCandidateGenerator
    from .features import context_features

    device = target.device
    ids = torch.randint(100, 1000, (1, context_length), device=device)
    costs = {}
    for block_size in block_sizes:
        cache = new_dynamic_cache(target.config)
        prefill = target(input_ids=ids[:, :-1], output_hidden_states=True, **cache_kwargs(target, cache))
        generator = BlockPilotCandidateGenerator(drafter, target, block_size)
        generator.add_context(context_features(prefill.hidden_states, drafter.config.target_layer_ids))
        timings = []

        def step():
            candidates, _ = generator.get_candidates(ids, block_size=block_size)
            target(input_ids=candidates[:, context_length - 1 :], **cache_kwargs(target, cache))

        for i in range(repeats + 2):  # two warm-up steps
            timings.append(_timed(step, device)[1])
            crop_cache(cache, block_size)
            # Keep the drafter's view fixed too: nothing new was committed.
            generator.pending_context = None
        costs[block_size] = sorted(timings[2:])[len(timings[2:]) // 2]
    return costs


@torch.no_grad()
def main(args):
    import transformers

    from .cli import DTYPES, load_prompts, load_target
    from .default_model import load_default_artifacts
    from .modeling_drafter import DFlashDrafter
    from .modeling_policy import BlockPolicy
    from .training.data import chat_prompt_ids

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU-only launches do not split work
    dtype = DTYPES[args.dtype]
    target, tokenizer = load_target(args.target, dtype, args.device or state.device)
    drafter, policy = (None, None)
    if args.target == "default":
        drafter, policy = load_default_artifacts(device=target.device, dtype=dtype)
    if args.drafter:
        drafter = DFlashDrafter.from_pretrained(args.drafter, dtype=dtype).to(target.device).eval()
    if args.policy:
        policy = BlockPolicy.from_pretrained(args.policy).to(target.device).eval()
    if args.step_costs:
        costs = measure_step_costs(target, drafter, [int(b) for b in args.block_sizes.split(",")])
        Path(args.step_costs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.step_costs).write_text(json.dumps(costs, indent=1))
        print(json.dumps(costs, indent=1))
        return costs
    methods = method_list(args, drafter, policy)
    prompts = load_prompts(args.prompts, args.limit, args.seed)
    device = target.device

    def measure(row, seed):
        ids = torch.tensor([chat_prompt_ids(tokenizer, row["prompt"])], device=device)
        _, prefill_seconds = _timed(lambda: target(input_ids=ids, logits_to_keep=1), device)
        results = []
        for method, block_size in methods:
            torch.manual_seed(seed)
            (seq, steps, used), seconds = _timed(
                lambda: run_method(target, drafter, policy, ids, method, block_size, args.max_new_tokens, args.temperature),
                device,
            )
            label = f"fixed={block_size}" if method == "fixed" else method
            results.append(
                {
                    "prompt_id": row["prompt_id"], "method": method, "label": label, "block_size": used,
                    "new_tokens": seq.shape[1] - ids.shape[1], "seconds": seconds, "prefill_seconds": prefill_seconds,
                    "tau": mean_tau(steps) if steps else None, "acceptance_lengths": steps,
                    "tokens": seq[0, ids.shape[1]:].tolist(),
                }
            )
        return results

    if prompts:
        measure(prompts[0], args.seed)  # warm-up: allocator, kernels, lazy inits; not recorded
    records = []
    with state.split_between_processes(prompts, apply_padding=True) as mine:
        for i, row in enumerate(tqdm(mine, desc="benchmark", disable=not state.is_main_process)):
            records.extend(measure(row, args.seed + i))
    records = gather_object(records)
    if not state.is_main_process:
        return None
    seen, unique = set(), []
    for r in records:  # apply_padding repeats the last prompts on some ranks
        if (r["prompt_id"], r["label"]) not in seen:
            seen.add((r["prompt_id"], r["label"]))
            unique.append(r)
    summary = summarize(unique)
    meta = {
        "target": args.target, "dataset": args.prompts, "prompts": len({r["prompt_id"] for r in unique}),
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "processes": state.num_processes, "torch": torch.__version__, "transformers": transformers.__version__,
        "methods": [m for m, _ in methods], "block_sizes": args.block_sizes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    (out / f"results{tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": unique}, indent=1))
    table = markdown_table(summary, meta)
    (out / f"results{tag}.md").write_text(table)
    try:
        plot(summary, out / f"results{tag}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install blockpilot-hf[bench])")
    print(table)
    return summary
