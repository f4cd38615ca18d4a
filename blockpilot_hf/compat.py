"""Every difference between the transformers versions we support (>= 5.17, < 6) lives here.

- The cache keyword of a model's `forward`: newer releases take `cache=` and deprecate `past_key_values=`, while 5.17
  silently ignores `cache=`. We read the forward signature instead of the version number.
- Output classes: `ModelOutput`s name their cache field `cache` in newer releases and `past_key_values` in 5.17.
- Static caches: `StaticCache` layers write at their own `cumulative_length` counter (a device tensor), whatever
  positions the model is given; 5.24 can `crop` them by a negative count, 5.17 cannot crop them at all. We set the
  counter ourselves (`set_cache_length`), which works on both and never leaves the device.
- Hidden-state capture: the index-list form of `output_hidden_states` changed meaning in 5.23, so we only ever ask for
  `output_hidden_states=True` and select layers ourselves.

It is also the one place that touches `StaticLayer` internals (`keys`, `values`, `cumulative_length`,
`lazy_initialization`): rolling back, copying rows into a smaller batch, compacting slots, reading a prefix. Those
helpers act on slot-numbered layers only; a drafter's sliding layers (`decoding.window_cache.WindowLayer`) are keyed
by position and copy their own rows.
"""

import contextlib
import dataclasses
import functools
import inspect

import torch
import transformers
from packaging import version
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
MIN_TRANSFORMERS = version.parse("5.17.0")


@functools.cache
def _forward_parameters(model_class: type) -> frozenset:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword a model's forward takes its KV cache under, for this transformers release."""
    parameters = _forward_parameters(type(model))
    if "past_key_values" in parameters:
        return {"past_key_values": cache}
    if "cache" in parameters:
        return {"cache": cache}
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`.")


@functools.cache
def _output_fields(output_class: type) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(output_class))


def output_cache_kwargs(output_class: type, cache) -> dict:
    """The field an output class (e.g. `BaseModelOutputWithPast`) stores the cache in, for this release."""
    return {"cache": cache} if "cache" in _output_fields(output_class) else {"past_key_values": cache}


def has_native_dflash() -> bool:
    """Whether this transformers has the stock `speculation_type="dflash"` path."""
    try:
        from transformers.generation.candidate_generator import DFlashTokenCandidateGenerator  # noqa: F401
    except ImportError:
        return False
    return True


def attention_layer_types(config) -> list[str]:
    """The attention type of every layer of a model (`"full_attention"`, `"sliding_attention"`, ...): its config's
    `layer_types`, else one type for all layers from `sliding_window` (Mistral-style configs have no `layer_types`)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    uniform = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [uniform] * config.num_hidden_layers


def sliding_window(config) -> int | None:
    """The window of a model's sliding-attention layers (`None` when it has none): a query at position `p` sees the
    keys at positions `p - window + 1 ... p`, as transformers' masks define it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "sliding_attention" not in attention_layer_types(config):
        return None
    return config.sliding_window


# Cache layers that keep one slot per token and can be rolled back by moving their write counter. A sliding-window
# layer is made a full one: its window is applied by the attention mask, so rejected drafts, compaction and the move
# to a smaller batch work on it as on any other layer (it then holds every token, not only the last `window`).
_SLOT_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer")


def new_static_cache(config, max_cache_len: int) -> StaticCache:
    """A preallocated cache of `max_cache_len` slots whose layers are all `StaticLayer`s (sliding-window layers
    included, see `_SLOT_LAYERS`), or a `ValueError` naming the layer types that cannot be rolled back slot by slot
    (linear attention, recurrent states, ...)."""
    unsupported = sorted(set(attention_layer_types(config)) - {"full_attention", "sliding_attention"})
    if unsupported:
        model = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"Block-diffusion speculative decoding serves full and sliding-window attention; this {model} model has "
            f"{unsupported} layers, whose caches cannot be rolled back slot by slot. Use another target."
        )
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if not kinds <= set(_SLOT_LAYERS):
        model = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"Block-diffusion speculative decoding needs cache layers it can roll back slot by slot (full or sliding-"
            f"window attention); this {model} model has {sorted(kinds - set(_SLOT_LAYERS))} cache layers "
            f"(layer types {sorted(set(attention_layer_types(config)))}). Use a target with attention layers only."
        )
    cache.layers = [
        layer if type(layer).__name__ == "StaticLayer" else StaticLayer(max_cache_len=max_cache_len)
        for layer in cache.layers
    ]
    return cache


def set_cache_length(cache: StaticCache, length: torch.Tensor) -> None:
    """Make every layer of a static cache write its next keys at slot `length` (a 0-d device tensor).

    Rolling the counter back is how rejected drafts are dropped: their slots are overwritten by the next write and
    masked until then. `copy_` keeps the counter's address, which CUDA graphs and `torch.compile` rely on.
    """
    for layer in _slot_layers(cache):
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.copy_(length)


def _slot_layers(cache) -> list[StaticLayer]:
    return [layer for layer in cache.layers if isinstance(layer, StaticLayer)]


def copy_cache_rows(cache: StaticCache, source: StaticCache, rows: torch.LongTensor) -> None:
    """Copy batch rows `rows` of `source` into `cache` (a static cache with `len(rows)` rows and the same slots),
    allocating `cache`'s buffers first where a layer has none yet. Layers `source` never allocated are skipped."""
    for layer, source_layer in zip(cache.layers, source.layers):
        if not isinstance(layer, StaticLayer):
            layer.take_rows(source_layer, rows)
            continue
        if not getattr(source_layer, "is_initialized", False):
            continue
        keys, values = source_layer.keys[rows], source_layer.values[rows]
        if not getattr(layer, "is_initialized", False):
            layer.lazy_initialization(keys, values)  # allocates the layer's (static) buffers
        layer.keys.copy_(keys)
        layer.values.copy_(values)


def place_cache_rows(
    cache: StaticCache, batch_size: int, source: StaticCache, rows: torch.LongTensor, into: torch.LongTensor, at: int
) -> None:
    """Write rows `rows` of `source` (a static cache of few slots: a chunk of prompts prefilled on its own) to rows
    `into` of `cache`, a static cache of `batch_size` rows, at slots `at...`; allocates `cache`'s buffers first where
    a layer has none yet. Layers `source` never allocated are skipped."""
    for layer, source_layer in zip(_slot_layers(cache), _slot_layers(source)):
        if not getattr(source_layer, "is_initialized", False):
            continue
        keys, values = source_layer.keys[rows], source_layer.values[rows]
        if not getattr(layer, "is_initialized", False):
            # Only the shape's heads and head size, the dtype and the device are read.
            layer.lazy_initialization(
                keys[:1].expand(batch_size, -1, -1, -1), values[:1].expand(batch_size, -1, -1, -1)
            )
        layer.keys[into, :, at : at + keys.shape[2]] = keys
        layer.values[into, :, at : at + values.shape[2]] = values


def gather_cache_slots(cache: StaticCache, order: torch.LongTensor) -> None:
    """In place, slot `s` of row `b` takes what slot `order[b, s]` held, for the first `order.shape[1]` slots of every
    slot-numbered layer (keys and values)."""
    for layer in _slot_layers(cache):
        if not getattr(layer, "is_initialized", False):
            continue
        for states in (layer.keys, layer.values):
            head = states[:, :, : order.shape[1]]
            index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            head.copy_(head.gather(2, index))


def readable_length(cache: StaticCache, wanted: int | None) -> int:
    """How many leading slots a forward's attention will read: `wanted`, or the whole cache when `wanted` is `None`
    or when a layer is not allocated yet (a fresh cache allocates its full buffers during the forward)."""
    layers = _slot_layers(cache)
    if not layers:
        return 0
    if wanted is None or not all(getattr(layer, "is_initialized", False) for layer in layers):
        return layers[0].max_cache_len
    return wanted


@contextlib.contextmanager
def static_cache_prefix(cache: StaticCache, length: int):
    """For one forward, attention reads only the first `length` slots of a static cache: each layer's keys and values
    become views of those slots (writes still land in the full buffers) and are restored afterwards.

    Eager decoding only (CUDA graphs need the full, fixed shapes): on CPU, reading the empty tail of a batch's cache
    can cost nearly as much as reading the weights (docs/performance.md).
    """
    swapped = []
    for layer in _slot_layers(cache):
        if getattr(layer, "is_initialized", False) and length < layer.keys.shape[2]:
            swapped.append((layer, layer.keys, layer.values))
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    try:
        yield
    finally:
        for layer, keys, values in swapped:
            layer.keys, layer.values = keys, values
