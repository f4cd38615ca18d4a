"""The bulk decoder's attention in prefill: SDPA (its key/value heads repeated for every query head) against
`grouped_attention` (each key/value head multiplied once with the query heads that share it, under the chunk's
causal mask over left padding), SmolLM2 in bf16 on one thread.

1. Prefill of one chunk of ~4,096 tokens (`decode_batch`'s default) of prompts of 150 / 450 tokens cut from the
   data's token stream, the two alternated 6 times, medians, as tokens per second.
2. A real batch as `regenerate` forms it (64 prompts of median length, each greedy + sampled at T 0.7, keeping
   features), 128 new tokens, alternated twice: grouped attention at decode steps only (as before) against grouped
   in prefill too, response tokens per second.
3. How far each lands from the fp32 target at the prompts' last tokens (32 prompts of 150 tokens): largest and mean
   logit difference, and how often the argmax agrees.

Run (background jobs paused): OMP_NUM_THREADS=1 .venv/bin/python results/current/drafter_data/prefill_attention.py DATA OUT_JSON
"""

import json
import statistics
import sys
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import blockpilot_hf.training.bulk_decoding as bulk_decoding
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.data import read_responses
from median_batch import cut_rows, distance_to, median_prompts, response_tokens_per_s  # beside this script


def grouped_at_decode_steps(module, query, key, value, attention_mask, **kwargs):
    if query.shape[2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return bulk_decoding.grouped_attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("grouped_at_decode_steps", grouped_at_decode_steps)
IMPLEMENTATIONS = {"sdpa": "sdpa", "grouped": bulk_decoding.GROUPED_ATTENTION}
rows = read_responses(sys.argv[1])
target, tokenizer = load_target("default", torch.bfloat16)
results = {"threads": torch.get_num_threads(), "prefill_tokens_per_s": {}, "batch_tokens_per_s": {}, "vs_fp32": {}}


def prompt_logits(model, implementation, prompts):
    model.set_attn_implementation(implementation)
    logits, _, _ = bulk_decoding._prefill(model, prompts, 0)
    model.set_attn_implementation("sdpa")
    return logits.float()


with torch.no_grad():
    for width in (150, 450):
        # Ragged as a real chunk is: the longest prompt sets the padding.
        prompts = [ids[: width - i % 9] for i, ids in enumerate(cut_rows(rows, 4096 // width, width))]
        times = {name: [] for name in IMPLEMENTATIONS}
        for _ in range(6):
            for name, implementation in IMPLEMENTATIONS.items():
                target.set_attn_implementation(implementation)
                start = time.perf_counter()
                bulk_decoding._prefill(target, prompts, 0, [1, 27])
                times[name].append(time.perf_counter() - start)
        target.set_attn_implementation("sdpa")
        tokens = sum(map(len, prompts))
        results["prefill_tokens_per_s"][width] = {name: tokens / statistics.median(t) for name, t in times.items()}
        print(width, results["prefill_tokens_per_s"][width], flush=True)

    prompts = median_prompts(rows)
    results["batch_prompt_tokens"] = [len(prompts[0]), len(prompts[-1])]
    variants = {"grouped_at_decode_steps": "grouped_at_decode_steps", "grouped": bulk_decoding.GROUPED_ATTENTION}
    for name in variants:
        results["batch_tokens_per_s"][name] = []
    for _ in range(2):
        for name, implementation in variants.items():
            bulk_decoding.GROUPED_ATTENTION = implementation  # what bulk_attention switches the target to
            rate = response_tokens_per_s(target, tokenizer, prompts)
            results["batch_tokens_per_s"][name].append(rate)
            print(name, f"{rate:.1f} tokens/s", flush=True)
    bulk_decoding.GROUPED_ATTENTION = variants["grouped"]

    reference, _ = load_target("default", torch.float32)
    prompts = cut_rows(rows, 32, 150)
    exact = prompt_logits(reference, "sdpa", prompts)
    del reference
    for name, implementation in IMPLEMENTATIONS.items():
        logits = prompt_logits(target, implementation, prompts)
        results["vs_fp32"][name] = distance_to(exact, logits)
    print(json.dumps(results, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
