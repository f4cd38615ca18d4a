"""Lossless block-diffusion speculative decoding inside `model.generate`.

One step of the loop (batch 1, numbered like transformers' `_assisted_decoding`):

1. draft   - `BlockPilotCandidateGenerator` embeds `[last committed token, MASK...]` (the block layout of
             `layout.py`), runs the drafter once and proposes `b - 1` tokens by argmax;
2. verify  - one target forward on the `b`-token block; logits processors run per position with the prefix that
             position would have seen;
3. accept  - the target picks its own token at every position (argmax, or a sample of its processed distribution);
             proposals are accepted while they equal the target's picks, then the target's next pick is committed;
4. commit  - tokens are appended one at a time so stopping criteria, EOS and streamers see exactly what plain
             `generate` would; the target cache is cropped to the committed length;
5. update  - the drafter receives the target features of the accepted rows.

Accepting a point-mass (argmax) proposal iff it equals the target's sample is exact speculative sampling: every
committed token is distributed as the target's own processed distribution given its prefix. With greedy decoding the
output is the target's greedy output, token for token.

Users reach this loop two ways: `blockpilot_hf.enable(target)` then `target.generate(..., assistant_model=drafter)`,
or without touching the instance, `target.generate(..., custom_generate=speculative_generate, drafter=drafter)`.
"""

import functools
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .compat import cache_kwargs, crop_cache, new_dynamic_cache, output_cache_kwargs
from .features import PrefillRepresentation, context_features
from .layout import build_block_layout
from .modeling_drafter import DFlashDrafter

logger = logging.get_logger(__name__)


@runtime_checkable
class BlockSizePolicy(Protocol):
    """What `generate(..., block_policy=...)` accepts besides `None` and an `int`.

    `choose_block_sizes` is called once per request, right after prefill, with the target's prefill representation,
    and returns one block size per sequence (a `torch.LongTensor` of shape `(batch,)`). The chosen size holds for the
    whole generation. [`BlockPolicy`] is the learned implementation.
    """

    def choose_block_sizes(self, prefill: PrefillRepresentation) -> torch.LongTensor: ...


@dataclass
class BlockPilotGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus speculative-decoding statistics.

    Attributes:
        acceptance_lengths (`list[list[int]]`): per sequence, the tokens committed at every decoding step
            (accepted proposals + 1). The first new token comes from prefill and is not a step, so a sequence's
            generated length is `1 + sum(acceptance_lengths[i])`.
        block_sizes (`list[int]`): per sequence, the block size used (chosen by the policy when one is given).
    """

    acceptance_lengths: list[list[int]] | None = None
    block_sizes: list[int] | None = None


# ----------------------------------------------------------------------------------------------- pure step functions


def select_tokens(scores: torch.Tensor, do_sample: bool) -> torch.LongTensor:
    """The target's pick at every position: argmax, or one sample of `softmax(scores)` (scores already processed)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), num_samples=1).view(probs.shape[:-1])


def accepted_prefix_length(proposals: torch.LongTensor, target_tokens: torch.LongTensor) -> torch.LongTensor:
    """Number of leading proposals equal to the target's picks at the same positions, per sequence.

    `proposals` and `target_tokens` have shape `(batch, k)`: proposal j is accepted iff it and every proposal before
    it match.
    """
    matches = (proposals == target_tokens).int()
    return matches.cumprod(dim=-1).sum(dim=-1)


def process_block_scores(
    logits_processor: LogitsProcessorList, candidate_ids: torch.LongTensor, logits: torch.Tensor, start: int
) -> torch.Tensor:
    """Apply logits processors at every block position with the prefix that position would have seen.

    `logits[:, k]` predicts the token at position `start + k`, so its prefix is `candidate_ids[:, : start + k]`.
    Position-dependent processors (repetition penalty, min length, ...) therefore behave as in plain decoding.
    """
    return torch.stack(
        [logits_processor(candidate_ids[:, : start + k], logits[:, k]) for k in range(logits.shape[1])], dim=1
    )


# ----------------------------------------------------------------------------------------------- the drafting strategy


class BlockPilotCandidateGenerator(CandidateGenerator):
    """Proposes `block_size - 1` tokens per step with a DFlash drafter conditioned on target features.

    Per-request state (draft KV cache, features not yet in it, the block size) lives on this instance, never on the
    models, so one request cannot change the next.

    Args:
        drafter (`DFlashDrafter`): the drafter.
        target (`PreTrainedModel`): the target, whose input embedding and LM head the drafter borrows.
        block_size (`int`): tokens per block, anchor included (`1` disables drafting).
    """

    def __init__(self, drafter: DFlashDrafter, target: PreTrainedModel, block_size: int):
        self.drafter = drafter
        self.block_size = block_size
        self.input_embeddings = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.cache = new_dynamic_cache(drafter.config)
        self.pending_context: torch.Tensor | None = None  # target features of committed tokens not yet in the cache
        self.pending_padding: torch.Tensor | None = None  # key padding mask over every draft key, if prompts are padded

    def add_context(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> None:
        """Queue target features of newly committed tokens: `(batch, n, len(target_layer_ids) * hidden)`."""
        features = features.to(self.drafter.device)
        if self.pending_context is None:
            self.pending_context = features
        else:
            self.pending_context = torch.cat([self.pending_context, features], dim=1)
        if padding_mask is not None:
            self.pending_padding = padding_mask

    def get_candidates(self, input_ids: torch.LongTensor, block_size: int | None = None, **kwargs):
        """Returns `(candidate_ids, None)`: `input_ids` followed by `block_size - 1` proposals.

        `input_ids` (`torch.LongTensor` of shape `(1, n)`) ends with the last committed token, the block's anchor at
        position `n - 1`. Its target features arrive with the next verification, so the drafter's context holds
        positions `< n - 1` only.
        """
        block_size = block_size or self.block_size
        if block_size <= 1:
            return input_ids, None
        drafter = self.drafter
        anchor_position = input_ids.shape[1] - 1
        layout = build_block_layout(
            anchor_ids=input_ids[:, -1:],
            anchor_positions=torch.full((input_ids.shape[0], 1), anchor_position, device=input_ids.device),
            block_size=block_size,
            mask_token_id=drafter.config.mask_token_id,
        )
        past = self.cache.get_seq_length()
        context = self.pending_context
        new_context = 0 if context is None else context.shape[1]
        if past + new_context != anchor_position:
            raise RuntimeError(
                f"Draft cache out of sync: {past} cached + {new_context} pending context positions, anchor at "
                f"{anchor_position}. This is a bug in the decoding loop."
            )
        positions = torch.arange(past, anchor_position, device=input_ids.device).expand(input_ids.shape[0], -1)
        position_ids = torch.cat([positions, layout.position_ids], dim=1)
        padding = None
        if self.pending_padding is not None:
            padding = torch.cat(
                [self.pending_padding[:, :anchor_position], self.pending_padding.new_ones(input_ids.shape[0], block_size)],
                dim=1,
            )
        hidden = drafter(
            noise_embeds=self.input_embeddings(layout.input_ids).to(drafter.device),
            context_hidden_states=context,
            position_ids=position_ids.to(drafter.device),
            attention_mask=padding,
            cache=self.cache,
        ).last_hidden_state
        # Rejected drafts must leave nothing behind: the cache keeps committed context only.
        crop_cache(self.cache, block_size)
        self.pending_context = None
        draft_logits = self.lm_head(hidden[:, 1:].to(self.lm_head.weight.dtype).to(self.lm_head.weight.device))
        proposals = draft_logits.argmax(dim=-1).to(input_ids.device)
        return torch.cat([input_ids, proposals], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        """No-op: the block size is chosen once per request (by the policy) and never tuned mid-request."""


# ----------------------------------------------------------------------------------------------- validation


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


def resolve_block_sizes(block_policy, drafter: DFlashDrafter, prefill: PrefillRepresentation) -> torch.LongTensor:
    """`None` -> the drafter's training size; `int` -> that size; a `BlockSizePolicy` -> its choice per sequence."""
    batch_size = prefill.last_logits.shape[0]
    if block_policy is None:
        sizes = torch.full((batch_size,), drafter.config.block_size, dtype=torch.long)
    elif isinstance(block_policy, int) and not isinstance(block_policy, bool):
        sizes = torch.full((batch_size,), block_policy, dtype=torch.long)
    elif isinstance(block_policy, BlockSizePolicy):
        check = getattr(block_policy, "check_compatible", None)
        if check is not None:
            check(drafter=drafter)
        sizes = torch.as_tensor(block_policy.choose_block_sizes(prefill), dtype=torch.long).reshape(-1).cpu()
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
    return sizes


def _check_generation_request(model, input_ids, generation_config: GenerationConfig, model_kwargs: dict) -> None:
    if generation_config.num_beams and generation_config.num_beams > 1:
        raise ValueError(
            "Beam search (num_beams > 1) cannot be combined with a DFlash drafter; drop `num_beams` or the drafter."
        )
    if generation_config.num_return_sequences and generation_config.num_return_sequences > 1:
        raise ValueError(
            "num_return_sequences > 1 is not supported with a DFlash drafter yet; call generate once per sample."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"Block-diffusion speculative decoding supports batch size 1 for now (got {input_ids.shape[0]}); call "
            "generate once per sequence."
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


# ----------------------------------------------------------------------------------------------- the decoding loop


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config: GenerationConfig | None = None,
    drafter: DFlashDrafter | None = None,
    block_policy=None,
    token_streamer=None,
    **model_kwargs,
):
    """Block-diffusion speculative decoding as a transformers `custom_generate` callable.

    Use it as `target.generate(input_ids, custom_generate=speculative_generate, drafter=drafter, block_policy=...)`;
    `generate` prepares the generation config, logits processors and stopping criteria and calls this function.
    (transformers never forwards `assistant_model` or `streamer` to a callable, hence `drafter` and `token_streamer`;
    `blockpilot_hf.enable(target)` lets you write `assistant_model=` and `streamer=` as usual.)

    Args:
        drafter (`DFlashDrafter`): the drafter.
        block_policy (`None`, `int` or `BlockSizePolicy`): block size, fixed or chosen per request after prefill.
        token_streamer (`BaseStreamer`, *optional*): receives the prompt, then exactly the committed tokens in order.

    Returns:
        `torch.LongTensor` of shape `(1, length)`, or a [`BlockPilotGenerateOutput`] with
        `return_dict_in_generate=True`.
    """
    if drafter is None:
        raise ValueError(
            "speculative_generate needs `drafter=`: pass your DFlashDrafter (transformers does not forward "
            "`assistant_model` to custom_generate callables), or call `blockpilot_hf.enable(target)` first."
        )
    generation_config = generation_config if generation_config is not None else model.generation_config
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    check_drafter_matches_target(drafter, model)
    _check_generation_request(model, input_ids, generation_config, model_kwargs)

    if generation_config.return_dict_in_generate and (
        generation_config.output_hidden_states or generation_config.output_attentions
    ):
        logger.warning_once(
            "output_hidden_states/output_attentions are not collected by block-diffusion speculative decoding; those "
            "fields of the output stay None (scores and logits are supported)."
        )
    do_sample = bool(generation_config.do_sample)
    max_length = generation_config.max_length
    output_scores = bool(generation_config.output_scores)
    output_logits = bool(generation_config.output_logits)
    scores, raw_logits = [], []

    # Padding: positions and masks follow the real tokens, as in plain generate.
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    num_pads = 0 if attention_mask is None else int((attention_mask == 0).sum())

    def target_forward(tokens: torch.LongTensor, start: int, logits_to_keep: int | None = None):
        """Run the target on `tokens` placed at sequence indices `start...`, appending to its cache."""
        kwargs = {}
        if attention_mask is not None:
            end = start + tokens.shape[1]
            mask = torch.cat([attention_mask, attention_mask.new_ones(1, max(0, end - attention_mask.shape[1]))], 1)
            kwargs["attention_mask"] = mask[:, :end]
            positions = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, start:end]
        if logits_to_keep is not None and model._supports_logits_to_keep():
            kwargs["logits_to_keep"] = logits_to_keep
        return model(
            input_ids=tokens, output_hidden_states=True, use_cache=True, **cache_kwargs(model, target_cache), **kwargs
        )

    def commit(tokens: torch.LongTensor, token_scores: torch.Tensor, token_logits: torch.Tensor) -> tuple[int, bool]:
        """Append tokens one at a time, as plain decoding would; returns (number committed, finished)."""
        nonlocal input_ids
        for k in range(tokens.shape[1]):
            input_ids = torch.cat([input_ids, tokens[:, k : k + 1]], dim=-1)
            if output_scores:
                scores.append(token_scores[:, k])
            if output_logits:
                raw_logits.append(token_logits[:, k])
            if token_streamer is not None:
                token_streamer.put(tokens[:, k].cpu())
            if bool(stopping_criteria(input_ids, token_scores[:, k]).any()):
                return k + 1, True
        return tokens.shape[1], False

    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())
    target_cache = new_dynamic_cache(model.config)
    layer_ids = drafter.config.target_layer_ids

    # Prefill: the first new token, the policy's input and the drafter's first context, all from one forward.
    outputs = target_forward(input_ids, 0, logits_to_keep=1)
    last_logits = outputs.logits[:, -1, :]
    prefill = PrefillRepresentation(
        last_logits=last_logits,
        last_hidden_state=outputs.hidden_states[-1][:, -1, :],
        prompt_lengths=torch.tensor([input_ids.shape[1] - num_pads], device=input_ids.device),
    )
    block_size = int(resolve_block_sizes(block_policy, drafter, prefill)[0])
    generator = BlockPilotCandidateGenerator(drafter, model, block_size)
    padding = None if attention_mask is None else torch.cat(
        [attention_mask, attention_mask.new_ones(1, max_length - attention_mask.shape[1] + block_size)], dim=1
    )
    generator.add_context(context_features(outputs.hidden_states, layer_ids), padding)
    first_scores = logits_processor(input_ids, last_logits)
    _, finished = commit(select_tokens(first_scores, do_sample)[:, None], first_scores[:, None], last_logits[:, None])
    del outputs, prefill

    acceptance_lengths = []
    while not finished:
        cur_len = input_ids.shape[1]
        # A block commits at most `b` new tokens: never draft past max_length.
        step_block_size = min(block_size, max_length - cur_len)
        if step_block_size < 1:
            break
        # 1. draft
        candidate_ids, _ = generator.get_candidates(input_ids, block_size=step_block_size)
        # 2. verify: the block is [anchor, proposals...] at positions cur_len-1 ... cur_len+b-2
        outputs = target_forward(candidate_ids[:, cur_len - 1 :], cur_len - 1)
        block_logits = outputs.logits
        block_scores = process_block_scores(logits_processor, candidate_ids, block_logits, cur_len)
        # 3. accept
        target_tokens = select_tokens(block_scores, do_sample)
        num_accepted = int(accepted_prefix_length(candidate_ids[:, cur_len:], target_tokens[:, :-1])[0])
        new_tokens = torch.cat([candidate_ids[:, cur_len : cur_len + num_accepted], target_tokens[:, num_accepted:][:, :1]], 1)
        # 4. commit, then keep only the committed positions in the target cache (the last token is the next anchor)
        num_committed, finished = commit(new_tokens, block_scores, block_logits)
        acceptance_lengths.append(num_committed)
        crop_cache(target_cache, step_block_size - (num_accepted + 1))
        # 5. the drafter learns the target features of the accepted rows (anchor + accepted proposals)
        generator.add_context(context_features(outputs.hidden_states, layer_ids)[:, : num_accepted + 1])
        generator.update_candidate_strategy(input_ids, block_scores, num_accepted)
        del outputs

    if token_streamer is not None:
        token_streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return BlockPilotGenerateOutput(
        sequences=input_ids,
        scores=tuple(scores) if output_scores else None,
        logits=tuple(raw_logits) if output_logits else None,
        **output_cache_kwargs(BlockPilotGenerateOutput, target_cache),
        acceptance_lengths=[acceptance_lengths],
        block_sizes=[block_size],
    )


# ----------------------------------------------------------------------------------------------- opt-in per instance

_UNSET = object()


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
                **kwargs,
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
