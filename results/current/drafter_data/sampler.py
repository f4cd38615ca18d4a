"""The bulk decoder's sampler: the exponential race it used against the inverse-CDF draw of `pick_tokens`, alone (64
rows of SmolLM2-sized logits, 49,152 tokens, T 0.7) and inside whole decode steps at batch 128 (64 greedy + 64
sampled rows of 128 real prompts of median length, keeping features), the two samplers alternated three times.

Run: OMP_NUM_THREADS=1 .venv/bin/python results/current/drafter_data/sampler.py DATA OUT_JSON
"""

import json
import sys
import time

import torch

import blockpilot_hf.training.bulk_decoding as bulk_decoding
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.data import read_responses


def exponential_race(logits, temperature, generator):
    """The sampler before: argmax(p / E), E ~ Exp(1) per vocabulary entry; greedy rows' argmax taken over all rows."""
    if not torch.is_tensor(temperature):
        if not temperature:
            return logits.argmax(dim=-1)
        temperature = torch.full(logits.shape[:1], float(temperature), device=logits.device)
    picks = logits.argmax(dim=-1)
    sampled = (temperature > 0).nonzero().squeeze(1)
    if len(sampled):
        scores = logits[sampled].float() / temperature[sampled, None]
        race = torch.empty_like(scores).exponential_(generator=generator)
        picks[sampled] = (scores - race.log()).argmax(dim=-1)
    return picks


def milliseconds(fn, repeats=10):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


torch.manual_seed(0)
logits = torch.randn(64, 49152, dtype=torch.bfloat16) * 3
temperature = torch.full((64,), 0.7)
generator = torch.Generator().manual_seed(0)
samplers = {"exponential_race": exponential_race, "pick_tokens": bulk_decoding.pick_tokens}
results = {
    "threads": torch.get_num_threads(),
    "sampling_64_rows_ms": {
        name: milliseconds(lambda: fn(logits, temperature, generator)) for name, fn in samplers.items()
    },
    "decode_step_ms_batch_128": {name: [] for name in samplers},
}
target, tokenizer = load_target("default", torch.bfloat16)
rows = sorted(read_responses(sys.argv[1]), key=lambda row: row["prompt_len"])
rows = rows[len(rows) // 2 : len(rows) // 2 + 128]
prompts = [row["input_ids"][: row["prompt_len"]] for row in rows]
results["prompt_tokens"] = [rows[0]["prompt_len"], rows[-1]["prompt_len"]]


def decode(steps):
    return bulk_decoding.decode_batch(
        target,
        prompts,
        tokenizer.pad_token_id or 0,
        set(),
        steps,
        temperature=[None, 0.7] * 64,
        generator=torch.Generator().manual_seed(0),
        feature_layer_ids=[1, 27],
    )


decode(2)
for _ in range(3):
    for name, sampler in samplers.items():
        bulk_decoding.pick_tokens = sampler
        one, many = milliseconds(lambda: decode(1), 1), milliseconds(lambda: decode(17), 1)
        results["decode_step_ms_batch_128"][name].append((many - one) / 16)
print(json.dumps(results, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
