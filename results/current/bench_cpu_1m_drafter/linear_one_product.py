"""One 576x1536 product (SmolLM2-135M's MLP width) at 1, 4, 16 and 64 rows in each linear form, microseconds per call
(300 calls after 20 warm-up calls, the torch default of 2 threads on 2 cores):

    .venv/bin/python results/current/bench_cpu_1m_drafter/linear_one_product.py
"""

import contextlib
import time

import torch
from torch import nn

from blockpilot_hf.cpu_linear import PackedLinear, WeightMajorLinear

FORMS = {"usual": contextlib.nullcontext, "packed": PackedLinear, "weight_major": WeightMajorLinear}


def microseconds(layer, form, rows: int, calls: int = 300) -> float:
    x = torch.randn(rows, layer.in_features)
    with form():
        for _ in range(20):
            layer(x)
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    torch.manual_seed(0)
    layer = nn.Linear(576, 1536, bias=False)
    for rows in (1, 4, 16, 64):
        print(rows, {name: round(microseconds(layer, form, rows), 1) for name, form in FORMS.items()})
