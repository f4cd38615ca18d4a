"""`blockpilot` command line: generate | regenerate | data-manifest | train-drafter | draft-vocab | collect-labels |
train-policy | bench | publish.

Every training/benchmark command also runs under `accelerate launch -m blockpilot_hf.cli ...` (any number of
processes); paths come only from arguments.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import TextStreamer

from .benchmark import add_arguments as add_benchmark_arguments
from .benchmark import main as bench_main
from .hub import publish
from .loading import (
    DTYPES,
    add_drafter_dtype_argument,
    chosen_drafter_dtype,
    comma_separated_floats,
    comma_separated_ints,
    default_drafter_path,
    load_drafter_and_policy,
    load_prompts,
    load_target,
)
from .metrics import mean_tau
from .modeling_drafter import DFlashDrafter, choose_mask_token_id
from .training.data import (
    chat_prompt_ids,
    frequent_token_ids,
    generation_jobs,
    jobs_not_done,
    leading_rows,
    merge_responses,
    read_jobs,
    read_responses,
    regenerate_responses,
    response_tokens,
    write_jobs,
)
from .training.drafter import DrafterTrainingArguments, train_drafter
from .training.feature_store import FeatureStore
from .training.labels import collect_labels
from .training.manifest import data_manifest, record_run
from .training.policy import PolicyTrainingArguments, train_policy_from_files


def _generate(args):

    target, tokenizer = load_target(args.target, DTYPES[args.dtype], args.device)
    drafter, policy = load_drafter_and_policy(args, target)
    if drafter is None:
        sys.exit("No drafter: pass --drafter PATH (none is shipped for this target).")
    block_policy = args.block_size if args.block_size is not None else policy
    ids = torch.tensor([chat_prompt_ids(tokenizer, args.prompt)], device=target.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = target.generate(
        ids,
        assistant_model=drafter,
        block_policy=block_policy,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        streamer=streamer,
        return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    steps = out.acceptance_lengths[0]
    tau = mean_tau(steps)
    chosen = "policy" if block_policy is policy and policy is not None else "fixed"
    print(
        f"\n[{new_tokens} tokens in {seconds:.2f}s: {new_tokens / seconds:.1f} tokens/s | block size "
        f"{out.block_sizes[0]} ({chosen}) | mean tau {tau:.2f} over {len(steps)} steps]"
    )


def _train_drafter(args):

    if args.output_dir is None and not args.generate_only:
        raise SystemExit(
            "train-drafter: --output-dir is required (or --generate-only to only add responses to --data)."
        )
    accelerator = Accelerator(mixed_precision="bf16" if args.dtype == "bf16" else "no")
    target, tokenizer = load_target(args.target, DTYPES[args.dtype], accelerator.device)
    data_path = Path(args.data)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    # Arguments first: a bad option fails before minutes of data generation.
    mask_token_id = args.mask_token_id
    if mask_token_id is None:
        mask_token_id = choose_mask_token_id(tokenizer)
    training_args = DrafterTrainingArguments(
        output_dir=args.output_dir,
        block_size=args.block_size,
        num_layers=args.num_layers,
        max_anchors=args.max_anchors,
        batch_size=args.batch_size,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        max_length=args.max_length,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        seed=args.seed,
        mask_token_id=mask_token_id,
        log_every_steps=args.log_every,
        save_every_steps=args.save_every,
        training_block_sizes=args.train_block_sizes,
        sliding_window=args.sliding_window,
        layer_types=args.layer_types,
        draft_vocab_size=args.draft_vocab_size or None,
        feature_store=args.feature_store,
        target_layer_ids=args.target_layer_ids,
        gamma=args.gamma,
        loss_weighting=args.loss_weighting,
        confidence_alpha=args.confidence_alpha,
        init_layers_from_target=args.init_layers_from_target,
        soft_targets=args.soft_targets,
    )
    if not args.skip_generation:
        prompts = load_prompts(args.prompts, args.num_prompts, args.seed, split="drafter")
        regenerate_responses(
            target,
            tokenizer,
            prompts,
            data_path,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size,
            sampled_copies=args.sampled_copies,
            time_budget_s=args.generation_time_budget,
            seed=args.seed,
        )
        if args.generate_only:
            accelerator.print(f"{len(read_responses(data_path))} training sequences in {data_path}")
            return
    rows = read_responses(data_path)
    if args.skip_train_tokens:
        skipped = len(leading_rows(rows, args.skip_train_tokens))
        if skipped == len(rows):
            raise SystemExit(
                f"--skip-train-tokens {args.skip_train_tokens} skips all {len(rows)} rows of {data_path}: the data "
                "holds no rows after them; skip fewer tokens, or add rows (`blockpilot regenerate`)."
            )
        rows = rows[skipped:]
    if args.max_train_tokens is not None:
        rows = leading_rows(rows, args.max_train_tokens)
    accelerator.print(f"{len(rows)} training sequences in {data_path}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    initial = None
    if args.init_drafter:
        initial = DFlashDrafter.from_pretrained(args.init_drafter, dtype=torch.float32)
    drafter = train_drafter(target, rows, training_args, drafter=initial, accelerator=accelerator, pad_token_id=pad)
    if accelerator.is_main_process:
        drafter.config.target_name_or_path = args.target_name or drafter.config.target_name_or_path
        drafter.save_pretrained(args.output_dir)
        print(f"drafter saved to {args.output_dir}")


def _regenerate(args):
    if args.feature_store and not args.target_layer_ids:
        raise SystemExit(
            "--feature-store needs --target-layer-ids: the target layers the drafter to be trained reads (its "
            "train-drafter --target-layer-ids, e.g. 1,27), so that its training finds these features."
        )
    target, tokenizer = load_target(args.target, DTYPES[args.dtype], args.device)
    jobs = None
    if args.jobs:
        jobs = read_jobs(args.jobs)
        # The run log counts prompts by source: a job's source is its prompt id's prefix.
        prompts = list(
            {
                job["prompt_id"]: {"prompt_id": job["prompt_id"], "source": job["prompt_id"].split("/", 1)[0]}
                for job in jobs
            }.values()
        )
    else:
        prompts = load_prompts(args.prompts, args.num_prompts, args.seed, split="drafter")
    if args.export_jobs:
        jobs = jobs or generation_jobs(
            tokenizer, prompts, args.sampled_copies, args.temperatures, args.max_prompt_tokens, args.seed
        )
        jobs = jobs_not_done(jobs, args.data)
        write_jobs(jobs, args.export_jobs)
        print(f"{len(jobs)} jobs not yet in {args.data} written to {args.export_jobs}")
        return
    feature_store = None
    if args.feature_store:
        feature_store = FeatureStore(args.feature_store, target, args.target_layer_ids, args.max_length)
    record_run(args.data, args.argv, prompts)
    regenerate_responses(
        target,
        tokenizer,
        prompts,
        args.data,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        sampled_copies=args.sampled_copies,
        temperature=args.temperatures,
        max_prompt_tokens=args.max_prompt_tokens,
        seed=args.seed,
        time_budget_s=args.time_budget,
        rows_per_shard=args.rows_per_shard,
        jobs=jobs,
        feature_store=feature_store,
    )


def _data_merge(args):

    added = merge_responses(args.sources, args.into)
    print(f"{added} rows added to {args.into}")


def _data_manifest(args):

    manifest = data_manifest(args.data)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(manifest, indent=2) + "\n")
    totals = manifest["totals"]
    print(f"{totals['rows']} rows, {totals['response_tokens']} response tokens in {args.data}; manifest: {args.out}")


def _collect_labels(args):

    target, tokenizer = load_target(args.target, DTYPES[args.dtype], args.device)
    drafter_dtype = chosen_drafter_dtype(args, target)  # the drafter as decoding runs it
    drafter = (
        DFlashDrafter.from_pretrained(args.drafter or default_drafter_path(), dtype=drafter_dtype)
        .to(target.device)
        .eval()
    )
    prompts = load_prompts(args.prompts, args.limit, args.seed, split="policy")
    collect_labels(
        target,
        drafter,
        tokenizer,
        prompts,
        args.out,
        args.block_sizes,
        args.max_new_tokens,
        logits_path=args.logits_dir,
        continuations_path=args.continuations,
        copy_tokens=args.copy_tokens,
        temperature=args.temperature,
    )


def _train_policy(args):

    train_policy_from_files(
        PolicyTrainingArguments(
            labels=args.labels,
            eval_labels=args.eval_labels,
            output_dir=args.output_dir,
            feature=args.feature,
            objective=args.objective,
            epochs=args.epochs,
            hidden_size=args.hidden_size,
            weight_decay=args.weight_decay,
            dropout=args.dropout,
            head_epochs=args.head_epochs,
            seed=args.seed,
            logits_dir=args.logits_dir,
            cost_file=args.cost_file,
            copy_tokens=args.copy_tokens,
        ),
        target_name=args.target,
        drafter_path=args.drafter or str(default_drafter_path()),
    )


def _bench(args):

    bench_main(args)


def _draft_vocab(args):

    drafter = DFlashDrafter.from_pretrained(args.drafter, dtype="auto")
    rows = read_responses(args.data)
    token_ids = frequent_token_ids(rows, args.size, exclude={drafter.config.mask_token_id})
    drafter.set_draft_vocabulary(token_ids)
    covered = set(token_ids)
    responses = [token for row in rows for token in response_tokens(row)]
    coverage = sum(token in covered for token in responses) / max(1, len(responses))
    out = Path(args.output_dir or args.drafter)
    if out != Path(args.drafter):  # the card and training logs travel with the weights
        out.mkdir(parents=True, exist_ok=True)
        for path in Path(args.drafter).iterdir():
            if path.is_file() and path.name not in ("config.json", "model.safetensors"):
                shutil.copy2(path, out / path.name)
    drafter.save_pretrained(out)
    print(
        f"draft vocabulary of {len(token_ids)} tokens covers {coverage:.2%} of {len(responses)} response tokens; saved to {out}"
    )


def _publish(args):

    publish(args.path, args.repo_id, token=args.token, private=args.private, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockpilot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, dtype="fp32"):
        p.add_argument(
            "--target", default="default", help="'default' (embedded SmolLM2-135M-Instruct) or a path/Hub id"
        )
        p.add_argument("--dtype", default=dtype, choices=sorted(DTYPES))
        p.add_argument("--device", default=None)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="stream an answer with the shipped drafter and policy")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--drafter", default=None)
    p.add_argument("--policy", default=None)
    add_drafter_dtype_argument(p)
    p.add_argument("--block-size", type=int, default=None, help="fixed block size instead of the policy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=_generate)

    def prompts_and_data(p, prompts: str):
        p.add_argument(
            "--prompts",
            default=prompts,
            help="'builtin' or 'scale' mix (drafter share), or a JSONL of {'prompt': ...}",
        )
        p.add_argument("--num-prompts", type=int, default=None)
        p.add_argument("--data", required=True, help="regenerated responses: a directory of shards or a .jsonl file")

    p = sub.add_parser("train-drafter", help="regenerate responses with the target and train a DFlash drafter")
    common(p)
    prompts_and_data(p, "builtin")
    generation = p.add_mutually_exclusive_group()
    generation.add_argument("--skip-generation", action="store_true", help="train on --data as it is")
    generation.add_argument(
        "--generate-only", action="store_true", help="add responses to --data and stop (train later, e.g. elsewhere)"
    )
    p.add_argument("--generation-batch-size", type=int, default=32)
    p.add_argument("--generation-time-budget", type=float, default=None)
    p.add_argument("--sampled-copies", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--output-dir", default=None, help="where the drafter goes (required unless --generate-only)")
    p.add_argument("--target-name", default=None, help="name recorded in the drafter config")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--train-block-sizes",
        type=comma_separated_ints,
        default=None,
        help="comma-separated block layouts to train, cycled per step (default: --block-size only), e.g. 4,16",
    )
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        help="draft layers see only this many context positions (all layers, unless --layer-types says which)",
    )
    p.add_argument(
        "--layer-types",
        type=lambda text: text.split(","),
        default=None,
        help="comma-separated, one per draft layer: sliding_attention or full_attention (with --sliding-window)",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="a fresh drafter proposes only this many of its data's most frequent tokens, and its loss is taken over "
        "them (a much cheaper step; e.g. 16384)",
    )
    p.add_argument(
        "--feature-store",
        default=None,
        help="directory for the target's features of the training rows: computed once, read back every epoch",
    )
    p.add_argument("--init-drafter", default=None, help="continue training this drafter instead of a fresh one")
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument(
        "--max-train-tokens",
        type=int,
        default=None,
        help="train on the first rows of --data holding this many response tokens (a random sample of a run: the "
        "generation order is random), e.g. for a learning curve",
    )
    p.add_argument(
        "--skip-train-tokens",
        type=int,
        default=None,
        help="leave out the first rows of --data holding this many response tokens (those --max-train-tokens chose "
        "for an earlier run), e.g. to train on from that run's drafter (--init-drafter) over rows it has not seen",
    )
    p.add_argument(
        "--target-layer-ids",
        type=comma_separated_ints,
        default=None,
        help="comma-separated target layers whose hidden states the drafter reads (default: 2 spread over depth)",
    )
    p.add_argument(
        "--gamma", type=float, default=None, help="loss weight decay over block positions, exp(-(k-1)/gamma)"
    )
    p.add_argument(
        "--loss-weighting",
        choices=["decay", "confidence"],
        default="decay",
        help="block positions weighted by exp(-(k-1)/gamma) (DFlash) or by the drafter's own confidence (D-PACE)",
    )
    p.add_argument("--confidence-alpha", type=float, default=0.5, help="D-PACE's confidence smoothing, in (0, 1]")
    p.add_argument(
        "--soft-targets",
        action="store_true",
        help="learn the target's distribution at each block position (KL), not only its token",
    )
    p.add_argument(
        "--init-layers-from-target",
        type=comma_separated_ints,
        default=None,
        help="comma-separated target layers the draft layers start from, one per draft layer (e.g. 28,29)",
    )
    p.add_argument("--max-anchors", type=int, default=64)
    p.add_argument("--warmup-ratio", type=float, default=0.04)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=6e-4)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--save-every", type=int, default=500, help="steps between checkpoints (a killed run resumes from the last)"
    )
    p.set_defaults(func=_train_drafter)

    p = sub.add_parser("regenerate", help="the target's own responses to a prompt mix, as resumable shards")
    common(p)
    prompts_and_data(p, "scale")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sampled-copies", type=int, default=1, help="sampled responses per prompt besides the greedy one")
    p.add_argument(
        "--temperatures",
        type=comma_separated_floats,
        default=[0.7, 1.0],
        help="comma-separated; each prompt's sampled copies are spread over them",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; stop after the batch that crosses it")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument(
        "--export-jobs",
        default=None,
        help="write the jobs not yet in --data (tokenized prompts, modes, temperatures) to this .npz and stop: "
        "another machine generates them with --jobs, without the prompt sources",
    )
    p.add_argument("--jobs", default=None, help="generate the jobs of this .npz (from --export-jobs), not --prompts")
    p.add_argument(
        "--feature-store",
        default=None,
        help="also keep the decoding forwards' features of every new row in this store (train-drafter's "
        "--feature-store then needs no target pass for them); needs --target-layer-ids",
    )
    p.add_argument(
        "--target-layer-ids",
        type=comma_separated_ints,
        default=None,
        help="comma-separated target layers the feature store keeps (the drafter's, e.g. 1,27)",
    )
    p.add_argument(
        "--max-length", type=int, default=768, help="rows are stored up to this many tokens, as training reads them"
    )
    p.set_defaults(func=_regenerate)

    p = sub.add_parser("data-merge", help="add regenerated rows made elsewhere (shard directories) to --into")
    p.add_argument("sources", nargs="+", help="shard directories or JSONL files (.jsonl.gz too)")
    p.add_argument("--into", required=True)
    p.set_defaults(func=_data_merge)

    p = sub.add_parser("data-manifest", help="sources, counts, token totals and hashes of regenerated data")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_data_manifest)

    p = sub.add_parser("collect-labels", help="tau at every candidate block size per prompt (policy labels)")
    common(p)
    p.add_argument("--drafter", default=None)
    add_drafter_dtype_argument(p)
    p.add_argument("--prompts", default="builtin")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--block-sizes", type=comma_separated_ints, default="12,13,14,15,16,17,18,19,20")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--logits-dir", default=None, help="also save raw prefill logits (the paper's feature)")
    p.add_argument(
        "--copy-tokens",
        type=int,
        default=0,
        help="also label every block size with a copy chain of this many tokens (prompt_lookup_num_tokens), and the "
        "copy chain alone",
    )
    p.add_argument(
        "--continuations",
        default=None,
        help="JSONL of the target's continuations: read where present, added where not (labelling several "
        "drafters of one target generates them once)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="label sampled decoding at this temperature (one sampled continuation per prompt); 0: greedy",
    )
    p.set_defaults(func=_collect_labels)

    p = sub.add_parser("train-policy", help="train the block-size policy on collected labels")
    p.add_argument(
        "--labels",
        required=True,
        help="collect-labels files, comma-separated; files at several temperatures (collect-labels --temperature) "
        "make a policy that reads the request's temperature",
    )
    p.add_argument(
        "--eval-labels", default=None, help="labels of a held-out set (e.g. HumanEval) to report on, comma-separated"
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--target", default="default")
    p.add_argument("--drafter", default=None)
    p.add_argument("--feature", default="prefill_summary", choices=["prefill_summary", "prefill_distribution"])
    p.add_argument("--objective", default="tau", choices=["tau", "throughput"])
    p.add_argument(
        "--cost-file",
        default=None,
        help="step costs per batch size and block size (`blockpilot bench --step-costs`, with --copy-tokens where the labels have a copy chain); with --objective throughput the policy keeps them and decides by them. Comma-separated files (or folders of them) from several machines: the first is the default (and prices the report), each other is used where the policy serves on the machine it was measured on",
    )
    p.add_argument("--logits-dir", default=None)
    p.add_argument(
        "--copy-tokens",
        type=int,
        default=None,
        help="the copy chain the policy may switch on per batch: by default the labels' (collect-labels "
        "--copy-tokens), 0 for never",
    )
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden-size", type=int, default=256, help="width of the policy's MLP")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--head-epochs",
        type=int,
        default=100,
        help="epochs of each further temperature's tau head (labels at several temperatures), on the frozen trunk",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_policy)

    p = sub.add_parser("bench", help="plain generate vs prompt lookup vs fixed block sizes vs policy vs oracle")
    common(p)
    add_benchmark_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("draft-vocab", help="let a drafter propose only the most frequent tokens of its training data")
    p.add_argument("--drafter", required=True)
    p.add_argument(
        "--data",
        required=True,
        help="the regenerated responses the drafter was trained on (shard directory or .jsonl)",
    )
    p.add_argument("--size", type=int, required=True, help="how many tokens, e.g. 16384")
    p.add_argument("--output-dir", default=None, help="default: overwrite --drafter")
    p.set_defaults(func=_draft_vocab)

    p = sub.add_parser("publish", help="push a drafter or policy directory to the Hub with its model card")
    p.add_argument("path")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.set_defaults(func=_publish)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `regenerate` records as its command
    args.func(args)


if __name__ == "__main__":
    main()
