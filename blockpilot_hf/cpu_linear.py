"""How the linear layers of a decoding step run on CPU when they see a few rows at a time.

A verify step multiplies every weight of the target by `batch x block_size` rows: a handful at batch 1. On CPU,
`torch.nn.functional.linear(x, W)` with 2 to ~16 rows can take a kernel path that is much slower per weight byte than
the same product written weight-major, `(W @ x.T).T`. On 2 cores of an AMD EPYC (torch 2.13, MKL), one pass of
4-row products over all of SmolLM2-135M's linear weights takes 51 ms through `linear` and 18 ms weight-major, while
one row (plain decoding) takes 33 ms either way; its 30 decoder layers run 4 new tokens in 51 ms, or 38 ms under
`WeightMajorLinear` (`results/matmul_rows_cpu.json`). A verify forward over 4 tokens then costs about what plain
decoding pays for 1.

Which form is faster depends on the CPU, the BLAS, the row count and what runs around the products, so each decoding
step measures itself once in both forms (`fastest_linear_form`) and keeps the faster. Both forms compute the same
product; only the order of the floating-point additions differs, as it already does between any two row counts.
"""

import contextlib
import threading
import time

import torch
from torch import nn

# Beyond this many rows a product is a regular matrix product for any BLAS: no measurement, plain `linear`.
MAX_WEIGHT_MAJOR_ROWS = 64
# Switch only for a clear gain, so that machines where both forms are close keep the usual one.
_REQUIRED_SPEEDUP = 1.1
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

_lock = threading.Lock()
_depth_per_thread: dict[int, int] = {}  # threads inside `WeightMajorLinear`, with their nesting depth
_usual_forward = nn.Linear.forward  # what `nn.Linear.forward` was before the first thread entered


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`linear(x, weight, bias)` computed as `(W @ x_2d.T).T + b`, or `None` where the usual `linear` should run:
    not plain CPU tensors (a quantized or otherwise wrapped weight keeps its own product), or rows outside
    `2...MAX_WEIGHT_MAJOR_ROWS`."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    plain = type(weight) in _PLAIN_TENSORS and type(x) in _PLAIN_TENSORS
    if not (plain and x.device.type == "cpu" and weight.dim() == 2 and 2 <= rows <= MAX_WEIGHT_MAJOR_ROWS):
        return None
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def weight_major_enabled() -> bool:
    """Whether the calling thread is inside `WeightMajorLinear`."""
    return threading.get_ident() in _depth_per_thread


def _linear_forward(self, input):
    if threading.get_ident() in _depth_per_thread:
        out = weight_major_linear(input, self.weight, self.bias)
        if out is not None:
            return out
    return _usual_forward(self, input)


class WeightMajorLinear(contextlib.AbstractContextManager):
    """Within this context, on the calling thread, every `nn.Linear` with plain CPU tensors and 2 to
    `MAX_WEIGHT_MAJOR_ROWS` rows computes `(W @ x_2d.T).T + b`; everything else, and other threads, run as usual.

    It swaps `nn.Linear.forward` while any thread is inside (the way accelerate's `init_empty_weights` swaps
    `nn.Module.register_parameter`). A `TorchFunctionMode` would see the same products but costs Python time on every
    torch call: SmolLM2 over 4 new tokens took 43.7 ms under such a mode and 38.4 ms with the swapped forward (64.8 ms
    through the usual `linear`; `results/linear_forms_cpu.py`)."""

    def __enter__(self):
        global _usual_forward
        ident = threading.get_ident()
        with _lock:
            if not _depth_per_thread:
                _usual_forward = nn.Linear.forward
                nn.Linear.forward = _linear_forward
            _depth_per_thread[ident] = _depth_per_thread.get(ident, 0) + 1
        return self

    def __exit__(self, *exc_info):
        ident = threading.get_ident()
        with _lock:
            depth = _depth_per_thread.pop(ident) - 1
            if depth:
                _depth_per_thread[ident] = depth
            if not _depth_per_thread:
                nn.Linear.forward = _usual_forward
        return False


@torch.no_grad()
def fastest_linear_form(step, rows: int, device: torch.device, repeats: int = 3):
    """`WeightMajorLinear` if `step` runs clearly faster under it on this machine, else `contextlib.nullcontext`.

    `step` is a decoding step (a function of no arguments, idempotent: running it again gives the same outputs and
    leaves the same state) whose linear layers see `rows` rows. It runs under each form in turn, `repeats` times after
    a warm-up round, and the best times are compared. It is the real step that is timed, not the products alone: how
    a product of a few rows behaves depends on what runs around it. No measurement off CPU or for rows outside
    `2...MAX_WEIGHT_MAJOR_ROWS`.
    """
    if torch.device(device).type != "cpu" or not 2 <= rows <= MAX_WEIGHT_MAJOR_ROWS:
        return contextlib.nullcontext
    times = {contextlib.nullcontext: [], WeightMajorLinear: []}
    for _ in range(repeats + 1):  # alternating, so that both forms see the same machine state
        for form, seconds in times.items():
            start = time.perf_counter()
            with form():
                step()
            seconds.append(time.perf_counter() - start)
    usual_s, weight_major_s = (min(seconds[1:]) for seconds in times.values())  # the first round warms up
    return WeightMajorLinear if weight_major_s * _REQUIRED_SPEEDUP < usual_s else contextlib.nullcontext
