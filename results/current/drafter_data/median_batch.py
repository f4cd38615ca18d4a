"""What the attention measurements share: rows cut from the data's token stream, the real batch they time end to end
(64 prompts of median length, each answered greedily and sampled at T 0.7 as `regenerate` forms its batches,
keeping features, 128 new tokens), and how far logits land from the fp32 target's."""

import time

import torch

from blockpilot_hf.training.bulk_decoding import decode_batch


def cut_rows(rows: list[dict], count: int, width: int) -> list[tuple[int, ...]]:
    """`count` token rows of `width` from the data's token stream, 997 tokens apart."""
    stream, needed = [], (count - 1) * 997 + width
    for row in rows:
        if len(stream) >= needed:
            break
        stream += row["input_ids"]
    if len(stream) < needed:
        raise ValueError(f"{count} rows of {width} tokens need {needed} tokens; the data holds {len(stream)}.")
    return [tuple(stream[i * 997 : i * 997 + width]) for i in range(count)]


def distance_to(exact: torch.Tensor, logits: torch.Tensor) -> dict:
    return {
        "max_abs_logit_difference": (logits - exact).abs().max().item(),
        "mean_abs_logit_difference": (logits - exact).abs().mean().item(),
        "argmax_agreement": (logits.argmax(-1) == exact.argmax(-1)).float().mean().item(),
    }


def median_prompts(rows: list[dict], count: int = 64) -> list[list[int]]:
    """`count` prompts from the middle of the data's prompt lengths, each twice (its greedy and its sampled row)."""
    by_length = sorted(rows, key=lambda row: row["prompt_len"])
    middle = by_length[len(by_length) // 2 : len(by_length) // 2 + count]
    return [row["input_ids"][: row["prompt_len"]] for row in middle for _ in range(2)]


def response_tokens_per_s(target, tokenizer, prompts: list[list[int]]) -> float:
    start = time.perf_counter()
    responses, _ = decode_batch(
        target,
        prompts,
        tokenizer.pad_token_id or 0,
        {tokenizer.eos_token_id},
        128,
        temperature=[None, 0.7] * (len(prompts) // 2),
        generator=torch.Generator().manual_seed(0),
        feature_layer_ids=[1, 27],
    )
    return sum(map(len, responses)) / (time.perf_counter() - start)
