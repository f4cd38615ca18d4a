"""Whether a bulk decode step gets cheaper per row at batch 256 than at the generator's 128: whole decode steps
(every layer, features kept, half the rows sampled at T 0.7) over 200 keys, SmolLM2 in bf16 on one thread, the two
sizes alternated three times, medians of 5 steps each.

Run (background jobs paused): OMP_NUM_THREADS=1 .venv/bin/python results/current/drafter_data/decode_batch_size.py DATA OUT_JSON
"""

import json
import statistics
import sys
import time

import torch

import blockpilot_hf.training.bulk_decoding as bulk_decoding
from blockpilot_hf.compat import new_static_cache, place_cache_rows
from blockpilot_hf.cpu_linear import decoding_linear_form
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.data import read_responses
from median_batch import cut_rows  # beside this script

WIDTH = 200
rows = read_responses(sys.argv[1])
target, _ = load_target("default", torch.bfloat16)
results = {"threads": torch.get_num_threads(), "keys": WIDTH, "ms_per_row": {}}
with torch.no_grad(), decoding_linear_form(target.device)(), bulk_decoding.bulk_attention(target):
    for batch in (128, 256) * 3:
        prompts = cut_rows(rows, batch, WIDTH)
        cache = new_static_cache(target.config, WIDTH + 256)
        for start in range(0, batch, 16):
            _, chunk_cache, _ = bulk_decoding._prefill(target, prompts[start : start + 16], 0)
            place_cache_rows(cache, batch, chunk_cache, torch.arange(16), torch.arange(start, start + 16), 0)
        slot_valid = torch.zeros(batch, WIDTH + 256, dtype=torch.bool)
        slot_valid[:, : WIDTH + 1] = True
        tokens, positions = torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), WIDTH)
        temperature = torch.tensor([0.0, 0.7] * (batch // 2))
        times = []
        for _ in range(6):  # the first is a warm-up
            start = time.perf_counter()
            logits, _ = bulk_decoding._forward(target, cache, slot_valid, tokens, positions, WIDTH, WIDTH + 1, [1, 27])
            bulk_decoding.pick_tokens(logits, temperature, None)
            times.append(time.perf_counter() - start)
        results["ms_per_row"].setdefault(batch, []).append(statistics.median(times[1:]) * 1000 / batch)
        print(batch, f"{results['ms_per_row'][batch][-1]:.2f} ms a row", flush=True)
        del cache
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
