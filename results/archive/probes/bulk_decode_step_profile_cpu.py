"""Where a bulk decode step goes with grouped attention: `torch.profiler` over 3 decode steps (and their token picks)
at batch 128 (half greedy, half T 0.7), 200 keys, features kept, SmolLM2 in bf16 on one thread; the ten ops of most
self time, as shares of the total.

Run (background jobs paused, jemalloc preloaded): OMP_NUM_THREADS=1 python results/archive/probes/bulk_decode_step_profile_cpu.py DATA
"""

import json
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import blockpilot_hf.training.bulk_decoding as bulk_decoding
from blockpilot_hf.compat import new_static_cache, place_cache_rows
from blockpilot_hf.cpu_linear import decoding_linear_form
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.data import read_responses

BATCH, WIDTH = 128, 200
rows = read_responses(sys.argv[1])
stream = [token for row in rows[:2000] for token in row["input_ids"]]
prompts = [tuple(stream[i * 997 : i * 997 + WIDTH]) for i in range(BATCH)]
target, _ = load_target("default", torch.bfloat16)
with torch.no_grad(), decoding_linear_form(target.device)(), bulk_decoding.bulk_attention(target):
    _, prefill_cache, _ = bulk_decoding._prefill(target, prompts, 0, [1, 27])
    cache = new_static_cache(target.config, WIDTH + 256)
    place_cache_rows(cache, BATCH, prefill_cache, torch.arange(BATCH), torch.arange(BATCH), 0)
    del prefill_cache
    slot_valid = torch.zeros(BATCH, WIDTH + 256, dtype=torch.bool)
    slot_valid[:, : WIDTH + 1] = True
    tokens, positions = torch.zeros(BATCH, 1, dtype=torch.long), torch.full((BATCH, 1), WIDTH)
    temperature = torch.tensor([0.0, 0.7] * (BATCH // 2))

    def step():
        logits, _ = bulk_decoding._forward(target, cache, slot_valid, tokens, positions, WIDTH, WIDTH + 1, [1, 27])
        bulk_decoding.pick_tokens(logits, temperature, None)

    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            step()
events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
total = sum(e.self_cpu_time_total for e in events)
result = {
    "step_ms": total / 3 / 1000,
    "self_time_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:10]},
}
print(json.dumps(result, indent=1))
pathlib.Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))
