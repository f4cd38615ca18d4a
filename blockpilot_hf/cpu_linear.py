"""How the linear layers of a decoding step run on CPU.

A verify step multiplies every weight of the target by `batch x block_size` rows: a handful at batch 1. On CPU the
usual `torch.nn.functional.linear(x, W)` is far from what memory bandwidth allows for so few rows. Two other forms
compute the same product:

- `PackedLinear`: oneDNN's `linear` over a copy of the weight reordered once into oneDNN's blocked layout (what
  inductor's weight prepacking does for a frozen model on CPU). It costs a second copy of each weight it has run.
- `WeightMajorLinear`: `(W @ x.T).T`, which keeps some BLAS builds off their slow path for 2 to ~16 rows. No copy.

Which of packed and usual is faster depends on the CPU and on the rows: on a 2-core AMD EPYC packed took 0.40-0.67 of
the usual time at every row count from 1 to 160, on a 2-core Xeon with AMX 1.57 at one row and 0.84 at 16
(docs/performance.md). So decoding (`decoding_linear_form`) runs `MeasuredLinear`: per product, the form that was
faster at its row count when this machine timed both, once (`measured_forms`), the timings kept in the cache
directory. Kept, not timed per step: every run on the machine then adds in the same order. All forms compute the
same product; only the order of the floating-point additions differs, as it already does between any two row counts.
"""

import contextlib
import json
import os
import threading
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from .hardware import cpu_description

# Beyond this many rows a product is a regular matrix product for any BLAS: plain `linear`, not weight-major.
MAX_WEIGHT_MAJOR_ROWS = 64
# The row counts `measured_forms` times; a product of r rows takes the form timed at the first of them >= r (the last
# for more). Decoding steps multiply batch x block rows: 1 to a few hundred.
TIMED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# What is timed: a model's worth of weights of a small decoder's shapes (SmolLM2-135M's), so that they do not stay in
# cache between passes, as a real step's do not.
TIMED_SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))
TIMED_LAYERS_PER_SHAPE = 30
MEASURED_FORMS_FILE = "linear_forms.json"
logger = logging.get_logger(__name__)
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


class _UsualLinear(LinearForm):
    """The usual `linear`, also inside another form (`time_linear_forms` may run within the first measured step)."""

    @staticmethod
    def product(layer, x):
        return None


def _machine() -> str:
    """What the timings depend on besides the dtype: the CPU, the threads products run on, and torch."""
    return f"{cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}"


def time_linear_forms(
    dtype: torch.dtype, rows: tuple[int, ...] = TIMED_ROWS, rounds: int = 2, passes: int = 2, min_cpu_share=0.75
) -> dict[int, dict[str, float]] | None:
    """Seconds one pass over `TIMED_SHAPES` layers takes per row count, in the usual form and packed: `{rows:
    {"usual": s, "packed": s}}`, the best of `rounds` (both forms interleaved in each) of the mean over `passes`.

    `None` when the machine is busy: while timing a row count this process ran less than `min_cpu_share` of its
    threads' wall time (others had the cores; such timings rank the forms at random). About 3 s in bf16 and 6 s in
    fp32 on 2 idle cores; a busy machine stops after the first row count."""
    generator = torch.Generator().manual_seed(0)
    layers = [
        nn.Linear(n_in, n_out, bias=False, dtype=dtype)
        for n_in, n_out in TIMED_SHAPES
        for _ in range(TIMED_LAYERS_PER_SHAPE)
    ]
    forms = {"usual": _UsualLinear, "packed": PackedLinear}  # forms, not a bare context: the caller may be in one
    timings = {}
    with torch.no_grad():
        for count in rows:
            inputs = {n_in: torch.randn(count, n_in, generator=generator).to(dtype) for n_in, _ in TIMED_SHAPES}
            best = {name: float("inf") for name in forms}
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                for name, form in forms.items():
                    with form():
                        for layer in layers:  # a pass untimed: packs the weights, warms the kernels
                            layer(inputs[layer.in_features])
                        start = time.perf_counter()
                        for _ in range(passes):
                            for layer in layers:
                                layer(inputs[layer.in_features])
                    best[name] = min(best[name], (time.perf_counter() - start) / passes)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if cpu < min_cpu_share * wall * torch.get_num_threads():
                return None
            timings[count] = best
    return timings  # the layers' packed copies go with them


_measured: dict[torch.dtype, tuple[bool, ...]] = {}  # dtype -> per TIMED_ROWS, whether packed is faster
_measure_lock = threading.Lock()  # not `_lock`: timing enters forms and packs weights, which take that one


def measured_forms_path() -> Path:
    from .default_model import cache_root  # imported here: default_model imports the decoder, which imports us

    return cache_root() / MEASURED_FORMS_FILE


def measured_forms(dtype: torch.dtype) -> tuple[bool, ...]:
    """Per `TIMED_ROWS`, whether the packed product was the faster on this machine in `dtype`: read from the cache
    directory's `linear_forms.json`, else timed now (`time_linear_forms`, seconds) and kept there. A file from another
    machine, thread count or torch is timed anew; deleting it times again (e.g. after timing on a busy machine)."""
    if dtype in _measured:
        return _measured[dtype]
    with _measure_lock:
        if dtype not in _measured:
            _measured[dtype] = _read_or_time_forms(measured_forms_path(), str(dtype).removeprefix("torch."), dtype)
    return _measured[dtype]


def _read_or_time_forms(path: Path, name: str, dtype: torch.dtype) -> tuple[bool, ...]:
    machine = _machine()
    try:
        kept = json.loads(path.read_text())
        kept = kept if kept.get("machine") == machine and kept.get("timed_rows") == list(TIMED_ROWS) else {}
    except (OSError, ValueError, AttributeError):
        kept = {}  # none yet, unreadable, or torn by a killed write: timed again
    if name not in kept.get("seconds", {}):
        # A first request waits for it (seconds): say why, once per machine and dtype.
        logger.warning(f"Timing packed against usual linear products in {name} once for this machine, kept in {path}.")
        timings = time_linear_forms(dtype)
        if timings is None:
            logger.warning(
                "The CPU is busy: linear products run packed in this process, and are timed again in the next."
            )
            return (True,) * len(TIMED_ROWS)
        kept = {"machine": machine, "timed_rows": list(TIMED_ROWS), "seconds": kept.get("seconds", {})}
        kept["seconds"][name] = {str(count): seconds for count, seconds in timings.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(kept, indent=1))
        partial.replace(path)  # whole or not at all: another process may be reading it
    seconds = kept["seconds"][name]
    return tuple(seconds[str(count)]["packed"] < seconds[str(count)]["usual"] for count in TIMED_ROWS)


def packs_at(dtype: torch.dtype, rows: int) -> bool:
    """Whether a product of `rows` rows in `dtype` runs packed under `MeasuredLinear`."""
    faster = _measured.get(dtype) or measured_forms(dtype)
    return faster[min((rows - 1).bit_length(), len(TIMED_ROWS) - 1)] if rows > 0 else False


class MeasuredLinear(LinearForm):
    """Each product packed (`packed_linear`) where packing was the faster at its row count on this machine
    (`measured_forms`), else the usual `linear`. What decoding runs on CPU."""

    @staticmethod
    def product(layer, x):
        if x.device.type != "cpu" or x.dtype not in _PACKED_DTYPES or not x.dim() or not x.shape[-1]:
            return None  # nothing to time: such a product is never packed
        if not packs_at(x.dtype, x.numel() // x.shape[-1]):
            return None
        return packed_linear(layer, x)


def active_linear_form() -> type | None:
    """The form the calling thread's linear layers run in (`None`: the usual `linear`)."""
    forms = _forms_per_thread.get(threading.get_ident())
    return forms[-1] if forms else None


def decoding_linear_form(device: torch.device):
    """The form decoding steps and prefill run their linear products in: `MeasuredLinear` on CPU where oneDNN's packed
    linear is available, else `contextlib.nullcontext` (the usual `linear`). A context manager class."""
    if torch.device(device).type == "cpu" and packing_available():
        return MeasuredLinear
    return contextlib.nullcontext
