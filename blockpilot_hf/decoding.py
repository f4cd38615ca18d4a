"""Lossless block-diffusion speculative decoding inside `model.generate`, for batches of any size.

One step of the loop (numbered like transformers' `_assisted_decoding`), for every sequence of the batch at once:

1. draft   - `DraftStep` runs the drafter once on `[last committed token, MASK...]` (the block layout of `layout.py`),
             conditioned on the target features of everything committed, and proposes `b - 1` tokens by argmax;
2. verify  - `VerifyStep` runs the target once on the block; logits processors run per position with the prefix
             that position would have seen;
3. accept  - the target picks its own token at every position (argmax, or a sample of its processed distribution);
             proposals are accepted while they equal the target's picks, then the target's next pick is committed;
4. commit  - on the host, tokens are appended one at a time so stopping criteria, EOS and streamers see exactly what
             plain `generate` would; this is the step's only device-to-host synchronisation;
5. update  - rejected slots become holes in the static caches (masked, later overwritten or compacted) and the
             drafter takes the target features of the accepted rows into its cache.

Accepting a point-mass (argmax) proposal iff it equals the target's sample is exact speculative sampling: every
committed token is distributed as the target's own processed distribution given its prefix. With greedy decoding the
output is the target's greedy output, token for token, row by row.

Both caches are preallocated and every step has fixed shapes, so on CUDA the draft and verify steps are captured once
as CUDA graphs and replayed (`cuda_graphs.py`); elsewhere the same code runs eagerly. In a batch, once at most half
the rows still run, those move to a smaller workspace (same slots, their cache rows copied), so finished rows stop
costing compute; that happens at most log2(batch) times per request.

Users reach this loop two ways: `blockpilot_hf.enable(target)` then `target.generate(..., assistant_model=drafter)`,
or without touching the instance, `target.generate(..., custom_generate=speculative_generate, drafter=drafter)`.
"""

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .compat import (
    cache_kwargs,
    copy_cache_rows,
    gather_cache_slots,
    new_static_cache,
    output_cache_kwargs,
    readable_length,
    set_cache_length,
    static_cache_prefix,
)
from .cpu_linear import fastest_linear_form
from .cuda_graphs import StepGraph
from .features import PrefillRepresentation, context_features
from .layout import build_block_layout
from .modeling_drafter import DFlashDrafter, draft_head, greedy_proposals

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
    """`GenerateDecoderOnlyOutput` plus speculative-decoding statistics. The cache field is `None`: the loop's static
    caches hold masked holes and are reused by the next request, so they cannot seed a continuation.

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


# ----------------------------------------------------------------------------------------------- cache slots

# Both models keep preallocated (static) KV caches whose slots are shared by every sequence of a batch: a verification
# writes each sequence's block at the same slots `[offset, offset + block)`, and sequences that accept fewer tokens
# than the best one leave holes there. `slot_valid[b, s]` says whether slot `s` holds a committed token of sequence
# `b`; masks are built from it, so holes, left padding and rejected drafts are never attended to. Slot `s` of the
# drafter cache holds the drafter's keys for the target features of slot `s`, so one `slot_valid` serves both. When
# holes fill the cache, `DecodingWorkspace.compact` moves every sequence's valid slots to the front.


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`0` where a key is visible and the dtype's minimum elsewhere: the mask form both eager and SDPA attention add."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )


def target_block_forward(
    model, cache, slot_valid, input_ids, position_ids, offset, layer_ids, logits_to_keep=None, key_length=None
):
    """Target forward over `input_ids` written at cache slots `offset...`. A query at slot `q` sees the valid slots
    (`slot_valid`) up to `q`: its sequence's committed tokens and, causally, its own block (which the caller marks
    valid), never padding or holes. Returns `(logits, context features, last hidden state)`.

    `key_length` (a host int, at least the block's last slot + 1) limits attention to the first slots; `None` reads
    the whole cache (fixed shapes, for CUDA graphs)."""
    key_length = readable_length(cache, key_length)
    set_cache_length(cache, offset)
    slots = torch.arange(key_length, device=offset.device)
    query_slots = offset + torch.arange(input_ids.shape[1], device=offset.device)
    visible = slot_valid[:, None, :key_length] & (slots[None, :] <= query_slots[:, None])[None]
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep is not None else {}
    with static_cache_prefix(cache, key_length):
        outputs = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=additive_mask(visible[:, None], model.dtype),
            use_cache=True,
            output_hidden_states=True,
            **cache_kwargs(model, cache),
            **kwargs,
        )
    return outputs.logits, context_features(outputs.hidden_states, layer_ids), outputs.hidden_states[-1][:, -1]


class FixedShapeStep:
    """What the draft and verify steps share: inputs and outputs in tensors whose addresses never change, so a step
    is captured once as a CUDA graph and replayed (`StepGraph`); on CPU, its first call times it in every form of its
    linear products and keeps the fastest (`cpu_linear.fastest_linear_form`), once per shape: steps of the same
    `shape` share `measured_forms` (workspaces of other capacities reuse what one of them measured). Subclasses define
    `forward`, idempotent as both need; `rows` is how many rows its linear layers see."""

    def __init__(self, device: torch.device, rows: int, use_graphs: bool, pool, measured_forms: dict, shape: tuple):
        self.device, self.rows = device, rows
        self.measured_forms, self.shape = measured_forms, shape
        self.linear_form = None  # set at the first call
        self.graph = StepGraph(self.run, enabled=use_graphs, pool=pool)

    def __call__(self):
        if self.linear_form is None:
            if self.shape not in self.measured_forms:
                self.measured_forms[self.shape] = fastest_linear_form(self.forward, self.rows, self.device)
            self.linear_form = self.measured_forms[self.shape]
        return self.graph()

    def run(self, *args):
        with (self.linear_form or contextlib.nullcontext)():
            return self.forward(*args)


class VerifyStep(FixedShapeStep):
    """One target forward over a block per sequence: `[anchor, proposals...]` written at slots `offset...`.

    Inputs are written in place into `block_ids`, `position_ids` and `offset`; the step returns the block's logits,
    the drafter's context features at every block position and the target's greedy picks.
    """

    def __init__(
        self, model, cache, slot_valid, layer_ids, batch_size: int, block_size: int, use_graphs, pool, measured_forms
    ):
        device = slot_valid.device
        self.model, self.cache, self.slot_valid, self.layer_ids = model, cache, slot_valid, layer_ids
        self.block_ids = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.key_length: int | None = None  # see `place`
        shape = ("verify", batch_size, block_size)
        super().__init__(device, batch_size * block_size, use_graphs, pool, measured_forms, shape)

    def place(self, offset: int) -> None:
        """The block goes to slots `offset...`; an eager step then reads only the slots up to its end (captured graphs
        read them all)."""
        self.offset.fill_(offset)
        self.key_length = offset + self.block_ids.shape[1]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
        # The block's own slots are valid while it is verified; acceptance then keeps only the committed ones.
        slots = torch.arange(self.slot_valid.shape[1], device=self.offset.device)
        self.slot_valid |= (slots >= self.offset) & (slots < self.offset + self.block_ids.shape[1])
        logits, features, _ = target_block_forward(
            self.model,
            self.cache,
            self.slot_valid,
            self.block_ids,
            self.position_ids,
            self.offset,
            self.layer_ids,
            key_length=None if self.graph.enabled else self.key_length,
        )
        return logits, features, logits.argmax(dim=-1)


class DraftStep(FixedShapeStep):
    """The drafting strategy: one drafter forward proposes `block_size - 1` tokens per sequence.

    The drafter first takes the target features of the last verified block (or of the prompt, after prefill) into
    its cache at the slots the target used, then denoises `[anchor, MASK, ...]` (the block layout of `layout.py`)
    attending to every valid context slot and to its own block. Sequence `b` sees only the first
    `row_block_sizes[b]` block positions, so its proposals are those of a block of its own size.
    """

    def __init__(
        self,
        drafter,
        target,
        lm_head,
        cache,
        slot_valid,
        batch_size,
        block_size,
        row_block_sizes,
        use_graphs,
        pool,
        measured_forms,
    ):
        device = slot_valid.device
        self.drafter, self.cache, self.slot_valid, self.block_size = drafter, cache, slot_valid, block_size
        self.input_embeddings = target.get_input_embeddings()
        self.lm_head = lm_head  # `modeling_drafter.draft_head`: the target's head in the drafter's dtype
        self.row_block_sizes = row_block_sizes  # shared with the workspace, set per request
        self.anchor_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.anchor_positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        feature_size = drafter.config.context_feature_size
        self.context = torch.zeros(batch_size, block_size, feature_size, dtype=drafter.dtype, device=device)
        self.context_positions = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
        self.context_offset = torch.zeros((), dtype=torch.long, device=device)
        self.key_length: int | None = None  # see `place`
        shape = ("draft", batch_size, block_size)
        super().__init__(device, batch_size * block_size, use_graphs, pool, measured_forms, shape)

    def place(self, context_offset: int, context_length: int) -> None:
        """The context (`context_length` positions) goes to slots `context_offset...` and the block right after; an
        eager step then reads only the slots up to the block's end (captured graphs read them all)."""
        self.context_offset.fill_(context_offset)
        self.key_length = context_offset + context_length + self.block_size

    def forward(self, context=None, context_positions=None, context_offset=None) -> torch.LongTensor:
        """Proposals `(batch, block_size - 1)`. Defaults read the step's own input tensors (`run(context, ...)` takes
        others, e.g. the prompt's features after prefill)."""
        context = self.context if context is None else context
        context_positions = self.context_positions if context_positions is None else context_positions
        context_offset = self.context_offset if context_offset is None else context_offset
        layout = build_block_layout(
            self.anchor_ids, self.anchor_positions, self.block_size, self.drafter.config.mask_token_id
        )
        set_cache_length(self.cache, context_offset)
        key_length = readable_length(self.cache, None if self.graph.enabled else self.key_length)
        slots = torch.arange(key_length, device=context_offset.device)
        block_start = context_offset + context.shape[1]
        in_block = (slots[None, :] >= block_start) & (slots[None, :] - block_start < self.row_block_sizes[:, None])
        visible = (self.slot_valid[:, :key_length] & (slots < block_start)) | in_block
        with static_cache_prefix(self.cache, key_length):
            hidden = self.drafter(
                noise_embeds=self.input_embeddings(layout.input_ids),
                context_hidden_states=context,
                position_ids=torch.cat([context_positions, layout.position_ids], dim=1),
                attention_mask=visible[:, None, None, :].expand(-1, 1, self.block_size, -1),
                cache=self.cache,
            ).last_hidden_state
        return greedy_proposals(self.lm_head, hidden[:, 1:])


class DecodingWorkspace:
    """Static caches, the slot mask and the captured steps for one target, drafter, batch size and capacity.

    Kept between requests (see `workspace_for`) so that captured CUDA graphs are replayed, not captured again.
    Nothing carries over from one request to the next: `reset` marks every slot empty, and empty slots are never
    attended to.
    """

    def __init__(
        self, model, drafter, batch_size: int, capacity: int, use_graphs: bool, head=None, measured_forms=None
    ):
        device = model.device
        self.model, self.drafter, self.batch_size, self.capacity = model, drafter, batch_size, capacity
        self.max_block_size = drafter.config.max_block_size
        self.use_graphs = use_graphs
        self.target_cache = new_static_cache(model.config, capacity)
        # The drafter writes a verified block's context at the block's own slots and its draft block right after.
        self.drafter_cache = new_static_cache(drafter.config, capacity + self.max_block_size)
        self.slot_valid = torch.zeros(batch_size, capacity + self.max_block_size, dtype=torch.bool, device=device)
        self.row_block_sizes = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Shared by every block size's draft step (and, through `head`, by other workspaces of the same models).
        self.draft_head = head if head is not None else draft_head(model, drafter)
        # The linear form each step shape measured fastest (`FixedShapeStep`), shared the same way.
        self.measured_forms = {} if measured_forms is None else measured_forms
        self.pool = torch.cuda.graph_pool_handle() if use_graphs and torch.cuda.is_available() else None
        self._steps = {}

    def steps(self, block_size: int) -> tuple[VerifyStep, "DraftStep"]:
        if block_size not in self._steps:
            layer_ids = self.drafter.config.target_layer_ids
            verify = VerifyStep(
                self.model,
                self.target_cache,
                self.slot_valid,
                layer_ids,
                self.batch_size,
                block_size,
                self.use_graphs,
                self.pool,
                self.measured_forms,
            )
            draft = DraftStep(
                self.drafter,
                self.model,
                self.draft_head,
                self.drafter_cache,
                self.slot_valid,
                self.batch_size,
                block_size,
                self.row_block_sizes,
                self.use_graphs,
                self.pool,
                self.measured_forms,
            )
            self._steps[block_size] = (verify, draft)
        return self._steps[block_size]

    def reset(self, prompt_mask: torch.Tensor) -> None:
        self.slot_valid.zero_()
        self.slot_valid[:, : prompt_mask.shape[1]] = prompt_mask

    def prefill(self, input_ids, position_ids, layer_ids):
        """The prompt into slots `0...`: returns `(last logits, context features, last hidden state)`.

        Its linear products run in the form verify steps of this batch size measured fastest (the usual one until one
        has): the prompt's many rows are not timed themselves, and on the CPU measured here packed weights win at 256
        rows as at 4 (`cpu_linear.py`)."""
        offset = torch.zeros((), dtype=torch.long, device=input_ids.device)
        measured = [
            form
            for (step, batch, _), form in self.measured_forms.items()
            if (step, batch) == ("verify", self.batch_size)
        ]
        with (measured[0] if measured else contextlib.nullcontext)():
            logits, features, last_hidden = target_block_forward(
                self.model,
                self.target_cache,
                self.slot_valid,
                input_ids,
                position_ids,
                offset,
                layer_ids,
                logits_to_keep=1,
                key_length=input_ids.shape[1],
            )
        return logits[:, -1], features, last_hidden

    def take_rows(self, source: "DecodingWorkspace", rows: torch.LongTensor) -> None:
        """Continue rows `rows` of `source` in this (smaller) workspace: their cache entries, valid slots and block
        sizes move over. Both workspaces have the same capacity, so every slot keeps its number."""
        copy_cache_rows(self.target_cache, source.target_cache, rows)
        copy_cache_rows(self.drafter_cache, source.drafter_cache, rows)
        self.slot_valid.copy_(source.slot_valid[rows])
        self.row_block_sizes.copy_(source.row_block_sizes[rows])

    def compact(self) -> int:
        """Move every sequence's valid slots to the front of both caches (order kept); returns the new offset."""
        valid = self.slot_valid[:, : self.capacity]
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        counts = valid.sum(dim=1)
        gather_cache_slots(self.target_cache, order)
        gather_cache_slots(self.drafter_cache, order)
        self.slot_valid.zero_()
        self.slot_valid[:, : self.capacity] = torch.arange(self.capacity, device=valid.device) < counts[:, None]
        return int(counts.max())


_MAX_WORKSPACES_PER_TARGET = 8  # a batch and the smaller ones it shrinks to (see `speculative_generate`)


def _parameters_fingerprint(module: torch.nn.Module) -> tuple:
    # A captured graph reads parameters at fixed addresses: `.to(dtype)` or reloading weights must not replay it; nor
    # may a drafter's new draft vocabulary reuse the scoring head made for the old one.
    params = list(module.parameters())
    token_ids = getattr(module, "draft_token_ids", None)
    vocabulary = None if token_ids is None else (token_ids.data_ptr(), token_ids.numel())
    return (params[0].data_ptr(), params[-1].data_ptr(), params[0].dtype, params[0].device, vocabulary)


def workspace_for(model, drafter, batch_size: int, capacity: int, use_graphs: bool) -> DecodingWorkspace:
    """The workspace for this request's shapes, reused from an earlier request when the models are unchanged.

    Workspaces live on the target (like transformers' own static cache), so they go when it goes; a few are kept.
    """
    key = (
        id(drafter),
        _parameters_fingerprint(drafter),
        _parameters_fingerprint(model),
        batch_size,
        capacity,
        use_graphs,
    )
    workspaces = model.__dict__.setdefault("_blockpilot_workspaces", {})
    workspace = workspaces.get(key)
    if workspace is None or workspace.drafter is not drafter:
        # A drafter's copy of the LM head (see `draft_head`) is as large as the head: one per pair of models; and steps
        # of one shape pick the same linear form whatever the cache capacity: measured once per pair.
        sibling = next((w for k, w in workspaces.items() if k[:3] == key[:3] and w.drafter is drafter), None)
        head, measured_forms = (sibling.draft_head, sibling.measured_forms) if sibling else (None, None)
        if len(workspaces) >= _MAX_WORKSPACES_PER_TARGET:
            workspaces.pop(next(iter(workspaces)))
        workspace = workspaces[key] = DecodingWorkspace(
            model, drafter, batch_size, capacity, use_graphs, head, measured_forms
        )
    return workspace


def cache_capacity(prompt_length: int, max_new_tokens: int, block_size: int, batch_size: int) -> int:
    """Slots per cache: the prompt, every new token, a block of look-ahead and, for batches, room for holes before
    a compaction is needed. Rounded up to 256 so that requests of similar length share captured graphs."""
    needed = prompt_length + max_new_tokens + 2 * block_size + (max_new_tokens if batch_size > 1 else 0)
    return -(-needed // 256) * 256


def resolve_backend(backend: str, device: torch.device) -> bool:
    """Whether to capture CUDA graphs: `"auto"` does on CUDA, `"cuda_graphs"` insists, `"eager"` never does."""
    if backend not in ("auto", "eager", "cuda_graphs"):
        raise ValueError(f"decoding_backend must be 'auto', 'eager' or 'cuda_graphs'; got {backend!r}.")
    if backend == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"decoding_backend='cuda_graphs' needs a CUDA target; this one is on {device}. Use 'auto'.")
    return backend != "eager" and device.type == "cuda"


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


# Generation modes a drafter cannot serve, and the `generate` settings that select them.
_MODE_SETTINGS = {
    "beam_search": "`num_beams` > 1",
    "beam_sample": "`num_beams` > 1",
    "group_beam_search": "`num_beams` / `num_beam_groups`",
    "constrained_beam_search": "`constraints` / `force_words_ids`",
    "contrastive_search": "`penalty_alpha`",
}


def _check_generation_request(
    model, drafter, input_ids, generation_config: GenerationConfig, model_kwargs: dict
) -> None:
    # The drafter speeds up greedy decoding and sampling; a call asking for anything else must not silently get those.
    for other_drafting in ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"):
        if getattr(generation_config, other_drafting, None):
            raise ValueError(
                f"`{other_drafting}` asks for another way of drafting; the DFlash drafter replaces it. Drop one of them."
            )
    if getattr(generation_config, "dola_layers", None) is not None:
        raise ValueError("DoLa decoding (`dola_layers`) cannot be combined with a DFlash drafter; drop one of them.")
    mode = str(generation_config.get_generation_mode().value)
    if mode not in ("greedy_search", "sample"):
        settings = _MODE_SETTINGS.get(mode, "the settings that select it")
        raise ValueError(
            f"{mode.replace('_', ' ').capitalize()} ({settings}) cannot be combined with a DFlash drafter, which speeds "
            f"up greedy decoding and sampling; drop {settings} or the drafter."
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


# ----------------------------------------------------------------------------------------------- the decoding loop


def _host_stopping(stopping_criteria: StoppingCriteriaList):
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
    decoding_backend: str = "auto",
    **model_kwargs,
):
    """Block-diffusion speculative decoding as a transformers `custom_generate` callable.

    Use it as `target.generate(input_ids, custom_generate=speculative_generate, drafter=drafter, block_policy=...)`;
    `generate` prepares the generation config, logits processors and stopping criteria and calls this function.
    (transformers never forwards `assistant_model` or `streamer` to a callable, hence `drafter` and `token_streamer`;
    `blockpilot_hf.enable(target)` lets you write `assistant_model=` and `streamer=` as usual.)

    Args:
        drafter (`DFlashDrafter`): the drafter.
        block_policy (`None`, `int` or `BlockSizePolicy`): block size, fixed or chosen per sequence after prefill.
        token_streamer (`BaseStreamer`, *optional*): receives the prompt, then exactly the committed tokens in order
            (batch size 1, like transformers' streamers).
        decoding_backend (`str`): `"auto"` replays the draft and verify steps as CUDA graphs on a CUDA target and runs
            them eagerly elsewhere; `"eager"` never captures; `"cuda_graphs"` requires CUDA. Outputs are identical.

    Returns:
        `torch.LongTensor` of shape `(batch, length)` (left-padded prompts, finished rows padded with the pad token,
        as plain `generate` returns them), or a [`BlockPilotGenerateOutput`] with `return_dict_in_generate=True`.
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
    _check_generation_request(model, drafter, input_ids, generation_config, model_kwargs)
    use_graphs = resolve_backend(decoding_backend, model.device)
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
    host_stopping = _host_stopping(stopping_criteria)
    eos, max_len, max_positions = host_stopping or (None, None, None)
    batch_size, prompt_length = input_ids.shape
    device = input_ids.device

    attention_mask = model_kwargs.get("attention_mask")
    prompt_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    real_prompt_lengths = prompt_mask.sum(dim=-1)

    # Per sequence, on the host: the tokens so far (padded prompt included, as plain generate counts them).
    sequences = input_ids.tolist()
    finished = [False] * batch_size
    acceptance_lengths = [[] for _ in range(batch_size)]
    row_scores = [[] for _ in range(batch_size)]
    row_logits = [[] for _ in range(batch_size)]

    def commit(row: int, tokens: list[int], token_scores: torch.Tensor, token_logits: torch.Tensor) -> int:
        """Append tokens one at a time, as plain decoding would; returns how many were committed."""
        for k, token in enumerate(tokens):
            sequences[row].append(token)
            # clones: with CUDA graphs the step's outputs are overwritten by the next replay
            if output_scores:
                row_scores[row].append(token_scores[k].clone())
            if output_logits:
                row_logits[row].append(token_logits[k].clone())
            if token_streamer is not None:
                token_streamer.put(torch.tensor([token]))
            if host_stopping is not None:
                length = len(sequences[row])
                stop = token in eos or (max_len is not None and length >= max_len)
                stop = stop or (max_positions is not None and length > max_positions)
            else:
                ids = torch.tensor([sequences[row]], device=device)
                stop = bool(stopping_criteria(ids, token_scores[k][None]).any())
            if stop:
                finished[row] = True
                return k + 1
        return len(tokens)

    if token_streamer is not None:
        if batch_size != 1:
            raise ValueError(f"Streamers take one sequence, as in transformers; got a batch of {batch_size}.")
        token_streamer.put(input_ids.cpu())

    # Prefill: the first new token, the policy's input and the drafter's first context, from one target forward.
    # Caches are sized for the largest block the drafter allows, so whatever size the policy then picks fits.
    max_new_tokens = max(max_length - prompt_length, 1)
    capacity = cache_capacity(prompt_length, max_new_tokens, drafter.config.max_block_size, batch_size)
    workspace = workspace_for(model, drafter, batch_size, capacity, use_graphs)
    workspace.reset(prompt_mask)
    layer_ids = drafter.config.target_layer_ids
    last_logits, prompt_features, last_hidden = workspace.prefill(input_ids, prompt_positions, layer_ids)
    prefill = PrefillRepresentation(
        last_logits=last_logits, last_hidden_state=last_hidden, prompt_lengths=real_prompt_lengths
    )
    block_sizes = resolve_block_sizes(block_policy, drafter, prefill)
    block_size = int(block_sizes.max())  # one verify shape for the batch; each sequence accepts at most its own size
    verify, draft = workspace.steps(block_size)
    workspace.row_block_sizes.copy_(block_sizes)
    row_block_sizes = block_sizes.tolist()

    first_scores = logits_processor(input_ids, last_logits)
    first_tokens = select_tokens(first_scores, do_sample).tolist()
    for row in range(batch_size):
        commit(row, first_tokens[row : row + 1], first_scores[row : row + 1], last_logits[row : row + 1])
    del prefill, last_hidden

    # The next anchors (last committed tokens) and their positions.
    anchors = first_tokens
    draft.anchor_ids.copy_(torch.tensor(anchors, device=device)[:, None])
    draft.anchor_positions.copy_(real_prompt_lengths[:, None])
    offset = prompt_length  # the slot where the next verified block starts
    if block_size > 1:
        draft.place(0, prompt_length)  # the prompt's features are the first context
        proposals = draft.run(prompt_features, prompt_positions, draft.context_offset)
    del prompt_features
    block_offsets = torch.arange(block_size, device=device)
    needs_processing = len(logits_processor) > 0 or do_sample
    row_processors = processors_per_row(logits_processor, batch_size)

    rows = list(range(batch_size))  # the request row of each workspace row; shrinks as rows finish
    while not all(finished):
        # 1. the block [anchor, proposals...] at slots offset..., positions anchor_position...
        if offset + block_size > workspace.capacity:
            offset = workspace.compact()
        verify.block_ids[:, :1].copy_(draft.anchor_ids)
        if block_size > 1:
            verify.block_ids[:, 1:].copy_(proposals)
        verify.position_ids.copy_(draft.anchor_positions + block_offsets)
        verify.place(offset)
        # 2. verify
        block_logits, block_features, greedy_tokens = verify()
        if needs_processing:
            processors, prefixes = [row_processors[r] for r in rows], [sequences[r] for r in rows]
            block_scores = _process_rows(processors, prefixes, verify.block_ids, block_logits)
            target_tokens = select_tokens(block_scores, do_sample)
        else:
            block_scores, target_tokens = block_logits, greedy_tokens
        # 3. accept, on the host: the one synchronisation of a step
        block_and_picks = torch.cat([verify.block_ids, target_tokens], dim=1).tolist()
        kept = [0] * len(rows)
        for i, row in enumerate(rows):
            if finished[row]:
                continue
            proposed, picks = block_and_picks[i][1:block_size], block_and_picks[i][block_size:]
            # never past the sequence's own block size, never past max_length
            limit = max(0, min(row_block_sizes[row] - 1, max_length - len(sequences[row]) - 1))
            num_accepted = 0
            while num_accepted < limit and proposed[num_accepted] == picks[num_accepted]:
                num_accepted += 1
            new_tokens = proposed[:num_accepted] + [picks[num_accepted]]
            # 4. commit (stopping criteria see every token, as in plain decoding)
            acceptance_lengths[row].append(commit(row, new_tokens, block_scores[i], block_logits[i]))
            if not finished[row]:
                kept[i] = num_accepted + 1  # anchor + accepted proposals enter the caches
        if all(finished):
            break
        kept_tensor = torch.tensor(kept, device=device)
        # Finished rows keep their last anchor and position (and draft junk nobody reads) so their state stays consistent.
        anchors = [sequences[row][-1] if kept[i] else anchors[i] for i, row in enumerate(rows)]
        # Rejected and finished rows' slots become holes; the next block starts after the longest kept run.
        workspace.slot_valid[:, offset : offset + block_size] = block_offsets < kept_tensor[:, None]
        draft.anchor_ids.copy_(torch.tensor(anchors, device=device)[:, None])
        draft.anchor_positions.add_(kept_tensor[:, None])
        running = [i for i, row in enumerate(rows) if not finished[row]]
        if len(running) <= len(rows) // 2:
            # Most rows are done: continue the others in a smaller batch, so finished rows stop costing compute
            # (plain `generate` keeps computing them until the last row ends). At most log2(batch) such moves.
            index = torch.tensor(running, device=device)
            smaller = workspace_for(model, drafter, len(running), workspace.capacity, use_graphs)
            smaller.take_rows(workspace, index)
            smaller_verify, smaller_draft = smaller.steps(block_size)
            smaller_draft.anchor_ids.copy_(draft.anchor_ids[index])
            smaller_draft.anchor_positions.copy_(draft.anchor_positions[index])
            block_features, positions = block_features[index], verify.position_ids[index]
            workspace, verify, draft = smaller, smaller_verify, smaller_draft
            rows, anchors, kept = [rows[i] for i in running], [anchors[i] for i in running], [kept[i] for i in running]
        else:
            positions = verify.position_ids
        # 5. draft the next block from the target features of this one
        if block_size > 1:
            draft.context.copy_(block_features)
            draft.context_positions.copy_(positions)
            draft.place(offset, block_size)
            proposals = draft()
        offset += max(kept)

    if token_streamer is not None:
        token_streamer.end()
    pad_token_id = _pad_token_id(generation_config)
    longest = max(len(row) for row in sequences)
    output_ids = torch.tensor([row + [pad_token_id] * (longest - len(row)) for row in sequences], device=device)
    if not generation_config.return_dict_in_generate:
        return output_ids
    return BlockPilotGenerateOutput(
        sequences=output_ids,
        scores=_stack_per_step(row_scores) if output_scores else None,
        logits=_stack_per_step(row_logits) if output_logits else None,
        # No cache: it holds masked holes and belongs to a workspace the next request reuses, so continuing from it
        # would be silently wrong.
        **output_cache_kwargs(BlockPilotGenerateOutput, None),
        acceptance_lengths=acceptance_lengths,
        block_sizes=block_sizes.tolist(),
    )


# Processor state with one entry per batch row (transformers builds it from the attention mask): sliced per row.
_PER_ROW_PROCESSOR_STATE = {"RepetitionPenaltyLogitsProcessor": ("prompt_ignore_length",)}


def processors_per_row(logits_processor: LogitsProcessorList, batch_size: int) -> list[LogitsProcessorList]:
    """One processor list per row. Rows progress at different speeds, so each is processed with its own prefix;
    processors holding per-row state get a copy with that row's slice."""
    if batch_size == 1:
        return [logits_processor]
    rows = []
    for row in range(batch_size):
        processors = LogitsProcessorList()
        for processor in logits_processor:
            if isinstance(processor, PrefixConstrainedLogitsProcessor):
                raise ValueError(
                    "prefix_allowed_tokens_fn needs the batch index of every row, which a speculative batch cannot "
                    "give row by row; call generate once per sequence."
                )
            names = _PER_ROW_PROCESSOR_STATE.get(type(processor).__name__, ())
            state = {
                n: getattr(processor, n)[row : row + 1] for n in names if torch.is_tensor(getattr(processor, n, None))
            }
            if state:
                processor = copy.copy(processor)
                processor.__dict__.update(state)
            processors.append(processor)
        rows.append(processors)
    return rows


def _process_rows(row_processors, sequences: list[list[int]], block_ids: torch.LongTensor, logits: torch.Tensor):
    """Processed scores of every block position of every row, each with the prefix it would have in plain decoding."""
    rows = []
    for row, tokens in enumerate(sequences):
        committed = torch.tensor([tokens], device=block_ids.device)
        candidate_ids = torch.cat([committed, block_ids[row : row + 1, 1:]], dim=1)
        rows.append(process_block_scores(row_processors[row], candidate_ids, logits[row : row + 1], len(tokens)))
    return torch.cat(rows, dim=0)


def _stack_per_step(per_row: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Per-token tuples `(batch, vocab)` as plain generate returns them; rows that finished earlier hold zeros."""
    steps = max(len(row) for row in per_row)
    template = next(row[0] for row in per_row if row)
    return tuple(
        torch.stack([row[t] if t < len(row) else torch.zeros_like(template) for row in per_row]) for t in range(steps)
    )


def _pad_token_id(generation_config: GenerationConfig) -> int:
    for candidate in (generation_config.pad_token_id, generation_config.eos_token_id):
        if candidate is not None:
            return int(torch.as_tensor(candidate).reshape(-1)[0])
    return 0


# ----------------------------------------------------------------------------------------------- opt-in per instance

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
