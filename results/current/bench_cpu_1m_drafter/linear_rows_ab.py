"""Packed against the usual `linear` by row count, on this CPU: 120 fp32 layers of SmolLM2-135M's shapes (a model's
worth, so the weights do not stay in cache), best of 3 rounds of 5 passes each, both forms interleaved.

    .venv/bin/python results/current/bench_cpu_1m_drafter/linear_rows_ab.py > results/current/bench_cpu_1m_drafter/linear_rows_ab.txt

Rows are what one product multiplies: batch x block tokens in a verify step, batch in a plain step.
"""

import time, torch
from torch import nn
from blockpilot_hf.cpu_linear import PackedLinear
torch.set_num_threads(2)
torch.manual_seed(0)
shapes = [(576, 1536), (1536, 576), (576, 576), (576, 192)]
layers = [nn.Linear(i, o, bias=False) for i, o in shapes for _ in range(30)]  # ~ a model's worth, so caches miss
def run(rows, form):
    xs = {i: torch.randn(rows, i) for i, _ in shapes}
    with torch.no_grad(), form():
        for l in layers: l(xs[l.in_features])
        t = time.perf_counter()
        for _ in range(5):
            for l in layers: l(xs[l.in_features])
        return (time.perf_counter() - t) / 5
import contextlib
for rows in (1, 2, 5, 10, 16, 32, 64, 160):
    res = {}
    for rep in range(3):
        for name, form in (("usual", contextlib.nullcontext), ("packed", PackedLinear)):
            res.setdefault(name, []).append(run(rows, form))
    u, p = min(res["usual"]), min(res["packed"])
    print(f"rows {rows:4d}: usual {u*1e3:7.2f} ms  packed {p*1e3:7.2f} ms  packed/usual {p/u:.2f}")
