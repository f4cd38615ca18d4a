"""`enable(model)`: `model.generate(..., assistant_model=drafter, block_policy=...)` on one model instance."""

import copy
import functools

from transformers import PreTrainedModel, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from ..modeling_drafter import DFlashDrafter
from .loop import speculative_generate

_UNSET = object()


def _stop_strings_as_criteria(model: PreTrainedModel, kwargs: dict) -> dict:
    """`generate` kwargs with `stop_strings` (from the call or the generation config) turned into a
    `StopStringCriteria` in `stopping_criteria`: transformers drops `tokenizer=` before calling a `custom_generate`
    callable, so it would refuse stop strings for want of a tokenizer."""
    tokenizer = kwargs.pop("tokenizer", None)
    config = kwargs.get("generation_config") or model.generation_config
    stop_strings = kwargs.pop("stop_strings", None) or config.stop_strings
    if stop_strings is None:
        return kwargs
    if tokenizer is None:
        raise ValueError("Generating with stop strings needs the model's tokenizer: pass `tokenizer=` to `generate`.")
    if config.stop_strings is not None:
        config = copy.deepcopy(config)
        config.stop_strings = None
        kwargs["generation_config"] = config
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    return {**kwargs, "stopping_criteria": criteria}


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Let `model.generate(..., assistant_model=drafter, block_policy=...)` use block-diffusion drafting.

    Only this instance changes (no global monkey-patching), and only calls whose `assistant_model` is a
    [`DFlashDrafter`] are rerouted: every other call, including `speculation_type="dflash"` (transformers' own DFlash
    path), reaches stock transformers unchanged. Returns `model`; calling it twice is harmless.
    """
    if getattr(model, "_blockpilot_enabled", False):
        return model
    stock_generate = model.generate

    @functools.wraps(stock_generate)
    def generate(*args, assistant_model=None, block_policy=_UNSET, **kwargs):
        if isinstance(assistant_model, DFlashDrafter) and kwargs.get("speculation_type") is None:
            return stock_generate(
                *args,
                custom_generate=speculative_generate,
                drafter=assistant_model,
                block_policy=None if block_policy is _UNSET else block_policy,
                token_streamer=kwargs.pop("streamer", None),
                **_stop_strings_as_criteria(model, kwargs),
            )
        if block_policy is not _UNSET:
            raise ValueError(
                "`block_policy` only applies when `assistant_model` is a blockpilot_hf.DFlashDrafter "
                f"(got {type(assistant_model).__name__}) and `speculation_type` is not set."
            )
        return stock_generate(*args, assistant_model=assistant_model, **kwargs)

    model.generate = generate
    model._blockpilot_enabled = True
    return model
