"""The greedy rows' pick of a bulk decode step: argmax over 64 rows of SmolLM2's 49,152 logits (half of a batch of
128), in bf16 and fp32, as `argmax`, `float().argmax` and `max(...).indices`, one thread, medians of 9 alternated, ms.

Run (background jobs paused, jemalloc preloaded): OMP_NUM_THREADS=1 python results/archive/probes/bf16_argmax_cpu.py
"""

import json
import pathlib
import statistics
import time

import torch

torch.manual_seed(0)
rows = torch.arange(0, 128, 2)
result = {}
for dtype in (torch.bfloat16, torch.float32):
    logits = torch.randn(128, 49152).to(dtype)
    variants = {
        "argmax": lambda: logits[rows].argmax(-1),
        "float_argmax": lambda: logits[rows].float().argmax(-1),
        "max_indices": lambda: logits[rows].max(-1).indices,
    }
    assert all(torch.equal(run(), variants["argmax"]()) for run in variants.values())
    times = {name: [] for name in variants}
    for _ in range(9):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    result[str(dtype).removeprefix("torch.")] = {name: round(statistics.median(t), 2) for name, t in times.items()}
print(json.dumps(result, indent=1))
pathlib.Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))
