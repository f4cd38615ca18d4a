"""What a request must satisfy before decoding starts, and how its settings resolve: the drafter against the target,
the generation mode, the block sizes (fixed or from a policy), the backend, the stopping rule and the pad token.
"""

import copy
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.utils import logging

from ..features import PrefillRepresentation
from ..modeling_drafter import DFlashDrafter
from .context_copy import DEFAULT_MAX_NGRAM

logger = logging.get_logger(__name__)


@runtime_checkable
class BlockSizePolicy(Protocol):
    """What `generate(..., block_policy=...)` accepts besides `None` and an `int`.

    `choose_block_sizes` is called once per request, right after prefill, with the target's prefill representation,
    and returns one block size per sequence (a `torch.LongTensor` of shape `(batch,)`). The chosen size holds for the
    whole generation. [`BlockPolicy`] is the learned implementation.

    A policy that can also switch on the copy chain (`prompt_lookup_num_tokens`) has a `copy_tokens` attribute (the
    chain's length) and `choose_block_sizes_and_copy(prefill, copy_tokens)`, returning the sizes and the chain for the
    batch (0 or its `copy_tokens`); `copy_tokens` is what the request fixed (`None`: nothing).
    """

    def choose_block_sizes(self, prefill: PrefillRepresentation) -> torch.LongTensor: ...


def policy_copy_tokens(block_policy) -> int:
    """The longest copy chain `block_policy` may switch on (0 for sizes and for policies that never copy)."""
    if getattr(block_policy, "choose_block_sizes_and_copy", None) is None:
        return 0
    return int(getattr(block_policy, "copy_tokens", 0) or 0)


def resolve_backend(backend: str, device: torch.device) -> bool:
    """Whether to capture CUDA graphs: `"auto"` does on CUDA, `"cuda_graphs"` insists, `"eager"` never does."""
    if backend not in ("auto", "eager", "cuda_graphs"):
        raise ValueError(f"decoding_backend must be 'auto', 'eager' or 'cuda_graphs'; got {backend!r}.")
    if backend == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"decoding_backend='cuda_graphs' needs a CUDA target; this one is on {device}. Use 'auto'.")
    return backend != "eager" and device.type == "cuda"


def check_drafter_matches_target(drafter, target: PreTrainedModel) -> None:
    """Raise a `ValueError` naming the fix when `drafter` cannot serve `target`."""
    if not isinstance(drafter, DFlashDrafter):
        raise TypeError(
            f"Expected a blockpilot_hf.DFlashDrafter as drafter, got {type(drafter).__name__}. Load one with "
            "`DFlashDrafter.from_pretrained(...)` or build one with `DFlashDrafter.from_target(target)`."
        )
    dc, tc = drafter.config, target.config.get_text_config()
    fix = "Use a drafter trained for this target (`blockpilot train-drafter`) or build one with `DFlashDrafter.from_target`."
    if dc.target_hidden_size != tc.hidden_size or dc.hidden_size != tc.hidden_size:
        raise ValueError(
            f"Drafter/target mismatch: the drafter expects target hidden size {dc.target_hidden_size} "
            f"(own width {dc.hidden_size}) but the target has {tc.hidden_size}. {fix}"
        )
    if dc.num_target_layers != tc.num_hidden_layers or max(dc.target_layer_ids) >= tc.num_hidden_layers:
        raise ValueError(
            f"Drafter/target mismatch: the drafter reads target layers {dc.target_layer_ids} of a "
            f"{dc.num_target_layers}-layer target, but this target has {tc.num_hidden_layers} layers. {fix}"
        )
    vocab = target.get_input_embeddings().weight.shape[0]
    if dc.target_vocab_size is not None and dc.target_vocab_size != vocab:
        raise ValueError(
            f"Drafter/target mismatch: the drafter was made for a vocabulary of {dc.target_vocab_size} tokens, the "
            f"target has {vocab}. {fix}"
        )
    if dc.mask_token_id is None or not 0 <= dc.mask_token_id < vocab:
        raise ValueError(
            f"The drafter's mask_token_id={dc.mask_token_id} is missing or outside the target vocabulary ({vocab}). "
            "Set `drafter.config.mask_token_id` to the mask token it was trained with."
        )


def resolve_block_sizes(
    block_policy, drafter: DFlashDrafter, prefill: PrefillRepresentation, copy_tokens: int | None = None
) -> tuple[torch.LongTensor, int]:
    """`(block size per sequence, copy chain length)`. Sizes: `None` -> the drafter's training size; `int` -> that
    size; a `BlockSizePolicy` -> its choice per sequence. The copy chain is `copy_tokens` where the request set it
    (`prompt_lookup_num_tokens`), else the policy's choice where it makes one, else none."""
    batch_size = prefill.last_logits.shape[0]
    chosen_copy = copy_tokens or 0
    if block_policy is None:
        sizes = torch.full((batch_size,), drafter.config.block_size, dtype=torch.long)
    elif isinstance(block_policy, int) and not isinstance(block_policy, bool):
        sizes = torch.full((batch_size,), block_policy, dtype=torch.long)
    elif isinstance(block_policy, BlockSizePolicy):
        check = getattr(block_policy, "check_compatible", None)
        if check is not None:
            check(drafter=drafter)
        if policy_copy_tokens(block_policy):
            sizes, policy_copy = block_policy.choose_block_sizes_and_copy(prefill, copy_tokens)
            chosen_copy = int(policy_copy) if copy_tokens is None else copy_tokens
        else:
            sizes = block_policy.choose_block_sizes(prefill)
        sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1).cpu()
        if sizes.numel() != batch_size:
            raise ValueError(f"The block policy returned {sizes.numel()} sizes for a batch of {batch_size}.")
    else:
        raise TypeError(
            f"block_policy must be None, an int or an object with `choose_block_sizes(prefill)`; got "
            f"{type(block_policy).__name__}."
        )
    max_size = drafter.config.max_block_size
    bad = [int(s) for s in sizes if not 1 <= int(s) <= max_size]
    if bad:
        raise ValueError(
            f"Block size {bad[0]} is out of range: it must be in [1, {max_size}] (the drafter's max_block_size). "
            "Pick a smaller block_policy or raise `drafter.config.max_block_size`."
        )
    if chosen_copy > max_size:
        raise ValueError(
            f"The block policy chose a copy chain of {chosen_copy} tokens, more than the drafter's max_block_size "
            f"({max_size}); pass `prompt_lookup_num_tokens` of at most {max_size}, or use a policy trained for it."
        )
    return sizes, chosen_copy


# Generation modes a drafter cannot serve, and the `generate` settings that select them.
_MODE_SETTINGS = {
    "beam_search": "`num_beams` > 1",
    "beam_sample": "`num_beams` > 1",
    "group_beam_search": "`num_beams` / `num_beam_groups`",
    "constrained_beam_search": "`constraints` / `force_words_ids`",
    "contrastive_search": "`penalty_alpha`",
}


def check_generation_request(
    model, drafter, input_ids, generation_config: GenerationConfig, model_kwargs: dict
) -> None:
    # The drafter speeds up greedy decoding and sampling; a call asking for anything else must not silently get those.
    for other_drafting in ("assistant_early_exit", "use_mtp"):
        if getattr(generation_config, other_drafting, None):
            raise ValueError(
                f"`{other_drafting}` asks for another way of drafting; the DFlash drafter replaces it. Drop one of them."
            )
    if getattr(generation_config, "dola_layers", None) is not None:
        raise ValueError("DoLa decoding (`dola_layers`) cannot be combined with a DFlash drafter; drop one of them.")
    copy_tokens, _ = copy_settings(generation_config)
    if (copy_tokens or 0) > drafter.config.max_block_size:
        raise ValueError(
            f"prompt_lookup_num_tokens={copy_tokens} is more than the drafter's max_block_size "
            f"({drafter.config.max_block_size}); copy at most that many tokens per step."
        )
    # Prompt lookup is the copy chain of this loop's verify tree, not transformers' assisted mode.
    mode = str(_without_prompt_lookup(generation_config).get_generation_mode().value)
    if mode not in ("greedy_search", "sample"):
        settings = _MODE_SETTINGS.get(mode, "the settings that select it")
        raise ValueError(
            f"{mode.replace('_', ' ').capitalize()} ({settings}) cannot be combined with a DFlash drafter, which speeds "
            f"up greedy decoding and sampling; drop {settings} or the drafter."
        )
    if generation_config.return_dict_in_generate and (
        generation_config.output_hidden_states or generation_config.output_attentions
    ):
        logger.warning_once(
            "output_hidden_states/output_attentions are not collected by block-diffusion speculative decoding; those "
            "fields of the output stay None (scores and logits are supported)."
        )
    if drafter.device != model.device:
        raise ValueError(
            f"The drafter is on {drafter.device} but the target is on {model.device}; move it with "
            "`drafter.to(target.device)`."
        )
    if model.config.is_encoder_decoder:
        raise ValueError("DFlash drafting needs a decoder-only target.")
    for key in ("cache", "past_key_values"):
        cache = model_kwargs.get(key)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "Passing a pre-filled cache is not supported with a DFlash drafter: the drafter needs the target's "
                "features of the whole prompt. Pass the full prompt instead."
            )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("A DFlash drafter needs `input_ids`, not `inputs_embeds`.")


def copy_settings(generation_config: GenerationConfig) -> tuple[int | None, int]:
    """`(copy_tokens, max_ngram)` of the copy chain (`context_copy.ContextCopyProposer`) from transformers' prompt
    lookup settings: `prompt_lookup_num_tokens` (`None` when unset: a block policy may choose; 0: no copy chain) and
    `max_matching_ngram_size` (`context_copy.DEFAULT_MAX_NGRAM` when unset; transformers' own prompt lookup defaults
    to 2)."""
    copy_tokens = getattr(generation_config, "prompt_lookup_num_tokens", None)
    max_ngram = getattr(generation_config, "max_matching_ngram_size", None) or DEFAULT_MAX_NGRAM
    for name, value in (("prompt_lookup_num_tokens", copy_tokens or 0), ("max_matching_ngram_size", max_ngram)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a whole number of tokens (at least 1); got {value!r}.")
    return copy_tokens, max_ngram


def sampling_temperature(generation_config: GenerationConfig) -> float:
    """The request's sampling temperature as a block policy reads it (`PrefillRepresentation.temperature`): 0 for
    greedy decoding, else `temperature` (1 when unset, as transformers samples then)."""
    if not generation_config.do_sample:
        return 0.0
    temperature = generation_config.temperature
    return 1.0 if temperature is None else float(temperature)


def _without_prompt_lookup(generation_config: GenerationConfig) -> GenerationConfig:
    if getattr(generation_config, "prompt_lookup_num_tokens", None) is None:
        return generation_config
    config = copy.copy(generation_config)
    config.prompt_lookup_num_tokens = None
    return config


def host_stopping(stopping_criteria: StoppingCriteriaList):
    """`(eos_token_ids, max_length, max_position_embeddings)` when the criteria are only the stock max-length and EOS
    ones, which can then be checked on the host without a device round trip per token; `None` otherwise."""
    eos, max_length, max_positions = set(), None, None
    for criterion in stopping_criteria:
        if isinstance(criterion, MaxLengthCriteria):
            max_length, max_positions = criterion.max_length, criterion.max_position_embeddings
        elif isinstance(criterion, EosTokenCriteria):
            eos.update(torch.as_tensor(criterion.eos_token_id).reshape(-1).tolist())
        else:
            return None
    return eos, max_length, max_positions


def pad_token_id(config) -> int:
    """The token that pads batches for a generation config or a tokenizer (anything with `pad_token_id` and
    `eos_token_id`): its pad token, else its (first) EOS, else 0."""
    for candidate in (config.pad_token_id, config.eos_token_id):
        if candidate is not None:
            return int(torch.as_tensor(candidate).reshape(-1)[0])
    return 0


def eos_token_ids(generation_config: GenerationConfig) -> set[int]:
    """The token ids that end a response under `generation_config` (one EOS or several; none)."""
    eos = generation_config.eos_token_id
    return set(torch.as_tensor([] if eos is None else eos).reshape(-1).tolist())


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (what follows it in a batch is padding)."""
    return next((tokens[: i + 1] for i, token in enumerate(tokens) if token in eos), tokens)
