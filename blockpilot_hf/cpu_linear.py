"""How the linear layers of a decoding step run on CPU.

A verify step multiplies every weight of the target by `batch x block_size` rows: a handful at batch 1. On CPU the
usual `torch.nn.functional.linear(x, W)` is far from what memory bandwidth allows for so few rows. Two other forms
compute the same product:

- `PackedLinear`: oneDNN's `linear` over a copy of the weight reordered once into oneDNN's blocked layout (what
  inductor's weight prepacking does for a frozen model on CPU). It costs a second copy of each weight it has run.
- `WeightMajorLinear`: `(W @ x.T).T`, which keeps some BLAS builds off their slow path for 2 to ~16 rows. No copy.

The rule decoding follows (`decoding_linear_form`): packed on CPU wherever this torch has oneDNN's packed linear,
the usual `linear` elsewhere. Packed was the fastest form at every row count and batch size measured on the CPUs this
project runs on (docs/performance.md); a rule, unlike timing each step, gives every run the same summation order.
All forms compute the same product; only the order of the floating-point additions differs, as it already does
between any two row counts.
"""

import contextlib
import threading
import weakref

import torch
from torch import nn

# Beyond this many rows a product is a regular matrix product for any BLAS: plain `linear`, not weight-major.
MAX_WEIGHT_MAJOR_ROWS = 64
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PACKED_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_forms_per_thread: dict[int, list[type]] = {}  # threads inside a form, innermost last
_usual_forward = nn.Linear.forward  # what `nn.Linear.forward` was before the first thread entered a form
_installed = False  # whether `nn.Linear.forward` routes through `_linear_forward`
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
    `nn.Module.register_parameter`). A `TorchFunctionMode` would see the same products but costs Python time on
    every torch call, a visible share of a step of a few tokens.
    """

    @staticmethod
    def product(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def __enter__(self):
        global _usual_forward, _installed
        ident = threading.get_ident()
        with _lock:
            if not _installed:
                _usual_forward, _installed = nn.Linear.forward, True
                nn.Linear.forward = _linear_forward
            _forms_per_thread.setdefault(ident, []).append(type(self))
        return self

    def __exit__(self, *exc_info):
        global _installed
        ident = threading.get_ident()
        with _lock:
            forms = _forms_per_thread[ident]
            forms.pop()
            if not forms:
                del _forms_per_thread[ident]
            # Put the usual forward back only if nobody patched `nn.Linear.forward` over ours meanwhile: restoring
            # would undo their patch. Left in place, ours passes every product on to the forward it found.
            if not _forms_per_thread and nn.Linear.forward is _linear_forward:
                nn.Linear.forward, _installed = _usual_forward, False
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


def decoding_linear_form(device: torch.device):
    """The form decoding steps and prefill run their linear products in: `PackedLinear` on CPU where oneDNN's packed
    linear is available, else `contextlib.nullcontext` (the usual `linear`). A context manager class."""
    if torch.device(device).type == "cpu" and packing_available():
        return PackedLinear
    return contextlib.nullcontext
