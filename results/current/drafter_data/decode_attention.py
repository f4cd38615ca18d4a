"""The bulk decoder's attention at decode steps: SDPA against `grouped_attention` (each key/value head multiplied
once with the query heads that share it), SmolLM2 in bf16 on one thread. The committed JSON was measured when it
grouped decode steps only; it groups prefill too now, so a rerun of part 2 measures both (prefill_attention.py
separates them).

1. One decode step at batch 64 with 150 / 450 / 700 keys (rows cut from the data's token stream) that are the first
   slots of a static cache 256 slots longer, as in `decode_batch`, the two alternated 8 times, medians. (With a cache
   exactly as long as the keys the grouped products ran faster still; on views of a longer one the keys' product took
   a slow path until the keys are copied.)
2. A real batch as `regenerate` forms it (64 prompts of median length, each greedy + sampled at T 0.7, keeping
   features), 128 new tokens, alternated twice: response tokens per second.
3. How far each lands from the fp32 target at one step (32 rows, 150 keys): largest and mean logit difference, and how
   often the argmax agrees.

Run (background jobs paused): OMP_NUM_THREADS=1 .venv/bin/python results/current/drafter_data/decode_attention.py DATA OUT_JSON
"""

import contextlib
import json
import statistics
import sys
import time

import torch

import blockpilot_hf.training.bulk_decoding as bulk_decoding
from blockpilot_hf.compat import new_static_cache, place_cache_rows
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.data import read_responses
from median_batch import cut_rows, distance_to, median_prompts, response_tokens_per_s  # beside this script

IMPLEMENTATIONS = {"sdpa": "sdpa", "grouped": bulk_decoding.GROUPED_ATTENTION}
rows = read_responses(sys.argv[1])
target, tokenizer = load_target("default", torch.bfloat16)
results = {"threads": torch.get_num_threads(), "step_ms_batch_64": {}, "batch_tokens_per_s": {}, "vs_fp32": {}}


def step_logits(model, implementation, prompts):
    """Logits of one decode step after `prompts` (its last token fed as the step's input)."""
    count, width = len(prompts), len(prompts[0])
    model.set_attn_implementation("sdpa")
    _, cache, _ = bulk_decoding._prefill(model, prompts, 0)
    model.set_attn_implementation(implementation)
    tokens = torch.tensor([[ids[-1]] for ids in prompts])
    slot_valid = torch.ones(count, width, dtype=torch.bool)
    logits, _ = bulk_decoding._forward(
        model, cache, slot_valid, tokens, torch.full((count, 1), width - 1), width - 1, width
    )
    return logits.float()


with torch.no_grad():
    for width in (150, 450, 700):
        prompts = cut_rows(rows, 64, width)
        _, prefill_cache, _ = bulk_decoding._prefill(target, prompts, 0, [1, 27])
        cache = new_static_cache(target.config, width + 256)
        place_cache_rows(cache, 64, prefill_cache, torch.arange(64), torch.arange(64), 0)
        del prefill_cache
        slot_valid = torch.zeros(64, width + 256, dtype=torch.bool)
        slot_valid[:, :width] = True
        tokens, positions = torch.zeros(64, 1, dtype=torch.long), torch.full((64, 1), width - 1)
        times = {name: [] for name in IMPLEMENTATIONS}
        for _ in range(8):
            for name, implementation in IMPLEMENTATIONS.items():
                target.set_attn_implementation(implementation)
                start = time.perf_counter()
                bulk_decoding._forward(target, cache, slot_valid, tokens, positions, width - 1, width, [1, 27])
                times[name].append((time.perf_counter() - start) * 1000)
        target.set_attn_implementation("sdpa")
        del cache
        results["step_ms_batch_64"][width] = {name: statistics.median(t) for name, t in times.items()}
        print(width, results["step_ms_batch_64"][width], flush=True)

    prompts = median_prompts(rows)
    results["batch_prompt_tokens"] = [len(prompts[0]), len(prompts[-1])]
    original = bulk_decoding.bulk_attention
    switch = {"sdpa": lambda target: contextlib.nullcontext(), "grouped": original}
    for name in switch:
        results["batch_tokens_per_s"][name] = []
    for _ in range(2):
        for name, attention in switch.items():
            bulk_decoding.bulk_attention = attention
            rate = response_tokens_per_s(target, tokenizer, prompts)
            results["batch_tokens_per_s"][name].append(rate)
            print(name, f"{rate:.1f} tokens/s", flush=True)
    bulk_decoding.bulk_attention = original

    reference, _ = load_target("default", torch.float32)
    prompts = cut_rows(rows, 32, 150)
    exact = step_logits(reference, "sdpa", prompts)
    for name, implementation in IMPLEMENTATIONS.items():
        logits = step_logits(target, implementation, prompts)
        results["vs_fp32"][name] = distance_to(exact, logits)
    print(json.dumps(results, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
