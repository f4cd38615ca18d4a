"""Response tokens per second of bulk decoding with and without a shared prefill, on real prompts of the scale mix.

A batch of 64 rows either answers 64 distinct prompts greedily (how `regenerate` batched before: one temperature per
batch, a prompt's greedy and sampled jobs far apart) or 32 prompts twice, greedy + T 1.0 (a prompt's jobs together,
its prefill shared). Usage: python results/current/drafter_data/shared_prefill.py DATA_DIR [OUT.json]
"""

import json
import sys
import time

import torch

from blockpilot_hf.loading import load_target
from blockpilot_hf.training.bulk_decoding import decode_batch
from blockpilot_hf.training.data import read_responses


def main(data_dir: str, out: str | None = None, rows: int = 64, max_new_tokens: int = 256):
    target, _ = load_target("default", torch.float32)
    greedy = [r for r in read_responses(data_dir) if r["mode"] == "greedy"][:2000]
    greedy.sort(key=lambda r: r["prompt_len"])
    middle = greedy[len(greedy) // 2 - rows : len(greedy) // 2 + rows]  # 2 x rows prompts of similar (median) length
    prompts = [r["input_ids"][: r["prompt_len"]] for r in middle]
    settings = {
        "distinct": (prompts[::2], [None] * rows),
        "shared": ([p for p in prompts[: rows // 2] for _ in range(2)], [None, 1.0] * (rows // 2)),
    }
    results = {}
    for name, (batch, temperatures) in settings.items():
        start = time.perf_counter()
        responses = decode_batch(target, batch, 2, {2}, max_new_tokens, temperatures, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        tokens = sum(map(len, responses))
        results[name] = {
            "rows": len(batch),
            "prompt_tokens": sum(map(len, batch)),
            "response_tokens": tokens,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1),
        }
        print(name, results[name], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
