"""Bulk decoding with the prompts prefilled in one forward (before) or in chunks of ~4,096 tokens (now), on real
batches of the scale data: 32 prompts x (greedy, sampled) as `regenerate` forms them, of short, median and long
prompts. Prefill alone for all three, the whole 256-token batch for the median one.
Usage: python results/current/drafter_data/chunked_prefill.py DATA_DIR [OUT.json]
"""

import json
import sys
import time

import torch

from blockpilot_hf.loading import load_target
from blockpilot_hf.training.bulk_decoding import decode_batch
from blockpilot_hf.training.data import read_responses

SETTINGS = {"one forward": 10**9, "chunks of 4096 tokens": 4096}


def timed(target, prompts, temperatures, max_new_tokens, prefill_tokens):
    start = time.perf_counter()
    responses = decode_batch(
        target,
        prompts,
        2,
        {2},
        max_new_tokens,
        temperatures,
        torch.Generator().manual_seed(0),
        prefill_tokens=prefill_tokens,
    )
    return time.perf_counter() - start, sum(map(len, responses))


def main(data_dir: str, out: str | None = None, prompts_per_batch: int = 32):
    target, _ = load_target("default", torch.float32)
    sampled = {r["prompt_id"]: r["temperature"] for r in read_responses(data_dir) if r["mode"] != "greedy"}
    greedy = sorted(
        (r for r in read_responses(data_dir) if r["mode"] == "greedy" and r["prompt_id"] in sampled),
        key=lambda r: r["prompt_len"],
    )
    picks = {"short": len(greedy) // 10, "median": len(greedy) // 2, "long": len(greedy) - prompts_per_batch}
    results = {}
    for name, at in picks.items():
        rows = greedy[at : at + prompts_per_batch]
        prompts = [r["input_ids"][: r["prompt_len"]] for r in rows for _ in range(2)]
        temperatures = [t for r in rows for t in (None, sampled[r["prompt_id"]])]
        prompt_tokens = sum(r["prompt_len"] for r in rows)
        results[name] = {"prompt_tokens": prompt_tokens, "rows": len(prompts)}
        for setting, prefill_tokens in SETTINGS.items():
            seconds, _ = timed(target, prompts, temperatures, 1, prefill_tokens)
            results[name][f"prefill tokens/s, {setting}"] = round(prompt_tokens / seconds, 1)
            if name == "median":
                seconds, tokens = timed(target, prompts, temperatures, 256, prefill_tokens)
                results[name][f"response tokens/s, {setting}"] = round(tokens / seconds, 1)
                results[name][f"response tokens, {setting}"] = tokens
            print(name, setting, results[name], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
