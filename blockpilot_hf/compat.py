"""Every difference between the transformers versions we support (>= 5.17, < 6) lives here.

- The cache keyword of a model's `forward`: newer releases take `cache=` and deprecate `past_key_values=`, while 5.17
  silently ignores `cache=`. We read the forward signature instead of the version number.
- `DynamicCache.crop`: older releases read a positive argument as the length to keep, 5.24 refuses positives and takes a
  negative count of tokens to remove. A negative count works on both; zero must never be passed (old releases read
  `crop(0)` as "keep nothing").
- Output classes: `ModelOutput`s name their cache field `cache` in newer releases and `past_key_values` in 5.17.
- Hidden-state capture: the index-list form of `output_hidden_states` changed meaning in 5.23, so we only ever ask for
  `output_hidden_states=True` and select layers ourselves.
"""

import dataclasses
import functools
import inspect

import torch
import transformers
from packaging import version
from transformers import DynamicCache

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
MIN_TRANSFORMERS = version.parse("5.17.0")


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _output_fields(output_class: type) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(output_class))


def output_cache_kwargs(output_class: type, cache) -> dict:
    """The field an output class (e.g. `BaseModelOutputWithPast`) stores the cache in, for this release."""
    return {"cache": cache} if "cache" in _output_fields(output_class) else {"past_key_values": cache}


def new_dynamic_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


def crop_cache(cache, num_tokens_to_remove: int) -> None:
    """Drop the last `num_tokens_to_remove` positions of a cache (no-op for 0)."""
    if num_tokens_to_remove < 0:
        raise ValueError(f"num_tokens_to_remove must be >= 0, got {num_tokens_to_remove}.")
    if num_tokens_to_remove:
        cache.crop(-num_tokens_to_remove)


def has_native_dflash() -> bool:
    """Whether this transformers has the stock `speculation_type="dflash"` path."""
    try:
        from transformers.generation.candidate_generator import DFlashTokenCandidateGenerator  # noqa: F401
    except ImportError:
        return False
    return True
