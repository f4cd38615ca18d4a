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
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Beyond this many rows a product is a regular matrix product for any BLAS: no measurement, plain `linear`.
MAX_WEIGHT_MAJOR_ROWS = 64
# Switch only for a clear gain, so that machines where both forms are close keep the usual one.
_REQUIRED_SPEEDUP = 1.1
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class WeightMajorLinear(TorchFunctionMode):
    """Within this mode, `F.linear(x, W, b)` (every `nn.Linear`) runs as `(W @ x_2d.T).T + b` for plain CPU tensors
    with 2 to `MAX_WEIGHT_MAJOR_ROWS` rows; every other call is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
            # plain tensors only: a quantized or otherwise wrapped weight keeps its own `linear`
            plain = type(weight) in _PLAIN_TENSORS and type(x) in _PLAIN_TENSORS
            if plain and x.device.type == "cpu" and weight.dim() == 2 and 2 <= rows <= MAX_WEIGHT_MAJOR_ROWS:
                out = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T
                if bias is not None:
                    out = out + bias
                return out.reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


@torch.no_grad()
def fastest_linear_form(step, rows: int, device: torch.device, repeats: int = 3):
    """`WeightMajorLinear` if `step` runs clearly faster under it on this machine, else `contextlib.nullcontext`.

    `step` is a decoding step (a function of no arguments, idempotent: running it again gives the same outputs and
    leaves the same state) whose linear layers see `rows` rows. It runs under each form in turn, `repeats` times after
    a warm-up round, and the best times are compared. It is the real step that is timed, not the products alone: how
    a product of a few rows behaves depends on what runs around it, and the mode itself costs Python time on every
    torch call (SmolLM2's decoder layers over 1 token: 33.0 ms, 36.6 ms under the mode, which changes no product
    there; `results/matmul_rows_cpu.json`). No measurement off CPU or for rows outside `2...MAX_WEIGHT_MAJOR_ROWS`.
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
