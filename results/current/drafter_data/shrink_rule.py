"""Bulk decoding of 64 real prompts (the first 64 greedy rows of shard-00001 of the scale data, mixed lengths), 256
new tokens, fp32, with the smaller-batch move at half the rows ended (the rule before) and at an eighth (now).
Usage: python results/current/drafter_data/shrink_rule.py   (2026-12-01: 119.4 vs 145.8 tokens/s, background jobs
paused; the same 13,355 response tokens both ways)."""
import time

import torch

from blockpilot_hf.loading import load_target
from blockpilot_hf.training.bulk_decoding import decode_batch
from blockpilot_hf.training.data import read_jsonl

target, _ = load_target("default", torch.float32)
rows = [r for r in read_jsonl('/root/.cache/blockpilot_hf/data/smollm2-scale-v1/shard-00001.jsonl')[:400] if r["mode"] == "greedy"][:64]
prompts = [r["input_ids"][: r["prompt_len"]] for r in rows]
print("known response lengths: mean", sum(len(r["input_ids"]) - r["prompt_len"] for r in rows) / 64)
for shrink_at in (0.5, 0.875):
    t0 = time.perf_counter(); out = decode_batch(target, prompts, 2, {2}, 256, None, shrink_at=shrink_at); dt = time.perf_counter() - t0
    n = sum(map(len, out)); print(shrink_at, round(dt, 1), "s", n, "tokens", round(n / dt, 1), "tokens/s", flush=True)
