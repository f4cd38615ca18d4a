"""The bulk decoder's sampler: the exponential race it used against the inverse-CDF draw of `pick_tokens`, on 64
rows of SmolLM2-sized logits (49,152 tokens) at T 0.7, and a whole decode step at batch 128 (64 greedy + 64 sampled
rows of real prompts, keeping features) with the current `pick_tokens`.

Run: OMP_NUM_THREADS=1 .venv/bin/python results/current/drafter_data/sampler.py DATA OUT_JSON
"""

import json
import sys
import time

import torch

from blockpilot_hf.loading import load_target
from blockpilot_hf.training.bulk_decoding import decode_batch, pick_tokens
from blockpilot_hf.training.data import read_responses


def exponential_race(logits, temperature, generator):
    scores = logits.float() / temperature[:, None]
    race = torch.empty_like(scores).exponential_(generator=generator)
    return (scores - race.log()).argmax(dim=-1)


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
results = {
    "threads": torch.get_num_threads(),
    "exponential_race_ms": milliseconds(lambda: exponential_race(logits, temperature, generator)),
    "pick_tokens_ms": milliseconds(lambda: pick_tokens(logits, temperature, generator)),
}
target, tokenizer = load_target("default", torch.bfloat16)
rows = read_responses(sys.argv[1])[:128]
prompts = [row["input_ids"][: row["prompt_len"]] for row in rows]


def decode(steps):
    return decode_batch(
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
one, many = milliseconds(lambda: decode(1), 1), milliseconds(lambda: decode(33), 1)
results["decode_step_ms_batch_128"] = (many - one) / 32
print(json.dumps(results, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
