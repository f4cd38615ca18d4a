"""How the linear layers of a decoding step run on CPU.

A verify step multiplies every weight of the target by `batch x block_size` rows: a handful at batch 1. On CPU the
usual `torch.nn.functional.linear(x, W)` is far from what the memory allows for so few rows. Two other forms of the
same product are faster on the 2 AMD EPYC cores this was measured on (torch 2.13, SmolLM2-135M in fp32, 256-token
context, `python results/linear_forms_cpu.py`):

- `PackedLinear`: oneDNN's `linear` over a copy of the weight reordered once into oneDNN's blocked layout (what
  inductor's weight prepacking does for a frozen model on CPU). A forward over 1 / 4 / 16 / 64 new tokens takes
  23.3 / 27.0 / 39.8 / 85.9 ms instead of 42.2 / 67.9 / 83.2 / 173.4 ms through `linear`. It costs a second copy of
  each weight it has run (what a step reads is then about 33 GB/s, near this machine's ~44 GB/s).
- `WeightMajorLinear`: `(W @ x.T).T`, which keeps MKL off its slow path for 2 to ~16 rows (4 tokens: 39.9 ms). No
  copy; a fallback where oneDNN is missing.

Which form is fastest depends on the CPU, the BLAS, the row count and what runs around the products, so each decoding
step measures itself once in every available form (`fastest_linear_form`) and keeps the fastest. All forms compute the
same product; only the order of the floating-point additions differs, as it already does between any two row counts.
"""

import contextlib
import threading
import time
import weakref

import torch
from torch import nn

# Beyond this many rows a product is a regular matrix product for any BLAS: plain `linear`, not weight-major.
MAX_WEIGHT_MAJOR_ROWS = 64
# Switch only for a clear gain, so that machines where the forms are close keep the usual one.
_REQUIRED_SPEEDUP = 1.1
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PACKED_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_forms_per_thread: dict[int, list[type]] = {}  # threads inside a form, innermost last
_usual_forward = nn.Linear.forward  # what `nn.Linear.forward` was before the first thread entered a form
# A layer's weight in oneDNN's layout, with what it was made from (address, in-place version, dtype, shape).
_packed_weights: "weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _plain_cpu_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # A quantized or otherwise wrapped weight keeps its own product.
    plain = type(weight) in _PLAIN_TENSORS and type(x) in _PLAIN_TENSORS
    return plain and x.device.type == "cpu" and weight.dim() == 2 and x.dim() > 0


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`linear(x, weight, bias)` computed as `(W @ x_2d.T).T + b`, or `None` where the usual `linear` should run:
    not plain CPU tensors, or rows outside `2...MAX_WEIGHT_MAJOR_ROWS`."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if not (_plain_cpu_product(x, weight) and 2 <= rows <= MAX_WEIGHT_MAJOR_ROWS):
        return None
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


# Looked up once: `packed_linear` asks for every product of a step.
_HAS_PACKED_OPS = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def packing_available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 and ARM CPU builds) and it is not switched off."""
    return _HAS_PACKED_OPS and torch.backends.mkldnn.enabled


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """`layer.weight` reordered into oneDNN's layout, made at the first call and again whenever the weight changed
    (new tensor, new dtype, or written in place: `_version` counts in-place writes). Freed with the layer."""
    weight = layer.weight
    made_from = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    entry = _packed_weights.get(layer)
    if entry is None or entry[0] != made_from:
        with _lock:
            entry = _packed_weights[layer] = (made_from, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return entry[1]


def release_packed_weights(model: nn.Module | None = None) -> int:
    """Free the packed copies of `model`'s linear layers (of every layer, without `model`); returns how many. They are
    made again at the next packed product."""
    with _lock:
        layers = list(_packed_weights) if model is None else [m for m in model.modules() if m in _packed_weights]
        for layer in layers:
            del _packed_weights[layer]
    return len(layers)


def packed_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` through oneDNN with the layer's packed weight, or `None` where the usual `linear` should run: not
    plain CPU tensors, a dtype oneDNN does not pack here, a product autograd must differentiate, or no oneDNN."""
    weight, bias = layer.weight, layer.bias
    dtypes_agree = x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
    # oneDNN's op has no backward: anything autograd must see through keeps the usual product.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not (_plain_cpu_product(x, weight) and dtypes_agree and weight.dtype in _PACKED_DTYPES and not needs_grad):
        return None
    if not packing_available():
        return None
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(layer), bias, "none", [], "")


def _linear_forward(self, input):
    forms = _forms_per_thread.get(threading.get_ident())
    if forms:
        out = forms[-1].product(self, input)
        if out is not None:
            return out
    return _usual_forward(self, input)


class LinearForm(contextlib.AbstractContextManager):
    """Within this context, on the calling thread, every `nn.Linear` computes `product(layer, x)` (where that returns
    `None`, the usual `linear`); other threads run as usual. Contexts nest; the innermost form applies.

    It swaps `nn.Linear.forward` while any thread is inside a form (the way accelerate's `init_empty_weights` swaps
    `nn.Module.register_parameter`). A `TorchFunctionMode` would see the same products but costs Python time on every
    torch call: SmolLM2 over 4 new tokens took 43.7 ms weight-major under such a mode, 38.4 ms with the swapped forward.
    """

    @staticmethod
    def product(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def __enter__(self):
        global _usual_forward
        ident = threading.get_ident()
        with _lock:
            if not _forms_per_thread:
                _usual_forward = nn.Linear.forward
                nn.Linear.forward = _linear_forward
            _forms_per_thread.setdefault(ident, []).append(type(self))
        return self

    def __exit__(self, *exc_info):
        ident = threading.get_ident()
        with _lock:
            forms = _forms_per_thread[ident]
            forms.pop()
            if not forms:
                del _forms_per_thread[ident]
            if not _forms_per_thread:
                nn.Linear.forward = _usual_forward
        return False


class WeightMajorLinear(LinearForm):
    """Products of 2 to `MAX_WEIGHT_MAJOR_ROWS` rows as `(W @ x_2d.T).T + b` (`weight_major_linear`)."""

    @staticmethod
    def product(layer, x):
        return weight_major_linear(x, layer.weight, layer.bias)


class PackedLinear(LinearForm):
    """Products through oneDNN with each layer's weight packed once (`packed_linear`), for fp32 and bf16 layers."""

    @staticmethod
    def product(layer, x):
        return packed_linear(layer, x)


def active_linear_form() -> type | None:
    """The form the calling thread's linear layers run in (`None`: the usual `linear`)."""
    forms = _forms_per_thread.get(threading.get_ident())
    return forms[-1] if forms else None


def candidate_linear_forms(rows: int, device: torch.device) -> list:
    """The forms a step whose linear layers see `rows` rows can run in here; the usual one first."""
    if torch.device(device).type != "cpu":
        return [contextlib.nullcontext]
    forms = [contextlib.nullcontext]
    if 2 <= rows <= MAX_WEIGHT_MAJOR_ROWS:
        forms.append(WeightMajorLinear)
    if packing_available():
        forms.append(PackedLinear)
    return forms


@torch.no_grad()
def fastest_linear_form(step, rows: int, device: torch.device, repeats: int = 3):
    """The form (`PackedLinear`, `WeightMajorLinear`, or `contextlib.nullcontext` for the usual `linear`) that `step`
    runs fastest in on this machine, if it is clearly faster than the usual one.

    `step` is a decoding step (a function of no arguments, idempotent: running it again gives the same outputs and
    leaves the same state) whose linear layers see `rows` rows. It runs under each candidate form in turn, `repeats`
    times after a warm-up round (which also packs the weights), and the best times are compared. It is the real step
    that is timed, not the products alone: how a product of a few rows behaves depends on what runs around it. No
    measurement off CPU.
    """
    forms = candidate_linear_forms(rows, device)
    if len(forms) == 1:
        return contextlib.nullcontext
    times = {form: [] for form in forms}
    for _ in range(repeats + 1):  # in turn, so that every form sees the same machine state
        for form, seconds in times.items():
            start = time.perf_counter()
            with form():
                step()
            seconds.append(time.perf_counter() - start)
    best = {form: min(seconds[1:]) for form, seconds in times.items()}  # the first round warms up
    fastest = min(best, key=best.get)
    return fastest if best[fastest] * _REQUIRED_SPEEDUP < best[contextlib.nullcontext] else contextlib.nullcontext
