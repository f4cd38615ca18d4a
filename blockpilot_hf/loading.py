"""What the commands load, shared by the CLI and the benchmark: targets (the embedded default or any causal LM), the
drafter and policy, prompt sets, dtypes, and the argparse types their options use."""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import prompts as prompt_sources
from .decoding import enable
from .default_model import DEFAULT_DRAFTER_PATH, default_target_path, load_default_artifacts
from .modeling_drafter import DFlashDrafter, drafter_dtype_for
from .modeling_policy import BlockPolicy
from .training.data import split_prompts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_target(name_or_path: str, dtype: torch.dtype, device=None):
    """`default` -> the embedded SmolLM2-135M-Instruct; anything else -> `from_pretrained` (path or cached Hub id)."""

    if name_or_path == "default":
        name_or_path = str(default_target_path())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    target = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return enable(target), tokenizer


PROMPT_MIXES = {"builtin": "TRAINING_SOURCES", "scale": "SCALE_SOURCES"}


def load_prompts(spec: str, limit: int | None, seed: int, split: str | None = None) -> list[dict]:
    """`builtin` (the training mix), `scale` (the wider mix of `prompts.SCALE_SOURCES`), `humaneval`, or a JSONL file
    of `{"prompt": ...}` rows. `split` picks the drafter or policy share of a built-in mix (`split_prompts`); a user's
    own file and HumanEval are used whole."""

    if spec == "humaneval":
        return prompt_sources.load_humaneval_prompts(limit)
    if spec not in PROMPT_MIXES:
        rows = prompt_sources.load_jsonl_prompts(spec)
        return rows[:limit] if limit else rows
    rows = prompt_sources.load_training_prompts(seed=seed, sources=getattr(prompt_sources, PROMPT_MIXES[spec]))
    if split is not None:
        rows = split_prompts(rows)[split]
    return rows[:limit] if limit else rows


def chosen_drafter_dtype(args, target) -> torch.dtype:

    return drafter_dtype_for(target) if args.drafter_dtype == "auto" else DTYPES[args.drafter_dtype]


def load_drafter_and_policy(args, target):
    """The drafter and policy of `generate` and `bench`: `--drafter`/`--policy`, else the pair shipped for the default
    target. An explicit `--drafter` replaces the whole shipped pair (the shipped policy was trained for the shipped
    drafter). The drafter runs in `--drafter-dtype` (`auto`: `modeling_drafter.drafter_dtype_for(target)`)."""

    drafter_dtype = chosen_drafter_dtype(args, target)
    drafter = policy = None
    if args.target == "default" and not args.drafter:
        drafter, policy = load_default_artifacts(device=target.device, dtype=drafter_dtype)
    if args.drafter:
        drafter = DFlashDrafter.from_pretrained(args.drafter, dtype=drafter_dtype).to(target.device).eval()
    if args.policy:
        policy = BlockPolicy.from_pretrained(args.policy).to(target.device).eval()
    return drafter, policy


def default_drafter_path():

    return DEFAULT_DRAFTER_PATH


def comma_separated_ints(text: str) -> list[int]:
    """argparse type for lists such as `4,16,2`: a malformed list is an argparse error naming the option."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,16,2, got {text!r}") from None


def comma_separated_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.7,1.0; got {text!r}") from None


def add_drafter_dtype_argument(p):
    p.add_argument(
        "--drafter-dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="'auto': bf16 next to an fp32 target where bf16 matmuls are fast, else the target's dtype",
    )
