"""Where a request's decoding runs: preallocated caches, the slot mask and the two fixed-shape steps (draft and
verify), kept on the target between requests so that captured CUDA graphs are replayed rather than captured again.
"""

import torch

from ..compat import (
    copy_cache_rows,
    gather_cache_slots,
    new_static_cache,
    readable_length,
    set_cache_length,
    static_cache_prefix,
)
from ..cpu_linear import decoding_linear_form
from ..cuda_graphs import StepGraph
from ..layout import build_block_layout
from ..modeling_drafter import draft_head, greedy_proposals
from .steps import target_block_forward
from .tree import VerifyTree
from .window_cache import WindowRing, window_layers


class FixedShapeStep:
    """What the draft and verify steps share: inputs and outputs in tensors whose addresses never change, so a step
    is captured once as a CUDA graph and replayed (`StepGraph`); elsewhere it runs eagerly, its linear products in the
    form `cpu_linear.decoding_linear_form` picks for the device. Subclasses define `forward`, idempotent as capture
    needs."""

    def __init__(self, device: torch.device, use_graphs: bool, pool):
        self.device = device
        self.linear_form = decoding_linear_form(device)
        self.graph = StepGraph(self.run, enabled=use_graphs, pool=pool)

    def __call__(self):
        return self.graph()

    def run(self, *args):
        with self.linear_form():
            return self.forward(*args)


class VerifyStep(FixedShapeStep):
    """One target forward over a block per sequence, written at slots `offset...`: `[anchor, proposals...]`, or with
    a copy chain the two chains of a `tree.VerifyTree`.

    Inputs are written in place into `block_ids`, `position_ids` and `offset`; the step returns the block's logits,
    the drafter's context features at every block position and the target's greedy picks.
    """

    def __init__(self, model, cache, slot_valid, layer_ids, batch_size: int, tree: VerifyTree, use_graphs, pool):
        device = slot_valid.device
        self.model, self.cache, self.slot_valid, self.layer_ids = model, cache, slot_valid, layer_ids
        self.tree = tree
        self.block_visibility = tree.visibility(device) if tree.copy_tokens else None  # None: the causal chain
        self.position_offsets = tree.position_offsets(device)
        self.block_ids = torch.zeros(batch_size, tree.length, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, tree.length, dtype=torch.long, device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.key_length: int | None = None  # see `place`
        super().__init__(device, use_graphs, pool)

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
            block_visibility=self.block_visibility,
        )
        return logits, features, logits.argmax(dim=-1)


class DraftStep(FixedShapeStep):
    """The drafting strategy: one drafter forward proposes `block_size - 1` tokens per sequence.

    The drafter first takes the target features of the last verified block (`context_length` slots, or the prompt
    after prefill) into its cache at the slots the target used, then denoises `[anchor, MASK, ...]` (the block layout of `layout.py`)
    attending to every valid context slot and to its own block. Sequence `b` sees only the first
    `row_block_sizes[b]` block positions, so its proposals are those of a block of its own size. Sliding draft layers
    keep their context in a ring of the last `sliding_window` positions instead (`window_cache`).
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
        window_ring=None,
        context_length=None,
    ):
        device = slot_valid.device
        self.drafter, self.cache, self.slot_valid, self.block_size = drafter, cache, slot_valid, block_size
        self.window_ring = window_ring  # the sliding layers' cache positions (`window_cache`); None without them
        self.input_embeddings = target.get_input_embeddings()
        self.lm_head = lm_head  # `modeling_drafter.draft_head`: the target's head in the drafter's dtype
        self.row_block_sizes = row_block_sizes  # shared with the workspace, set per request
        self.anchor_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.anchor_positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        feature_size = drafter.config.context_feature_size
        context_length = block_size if context_length is None else context_length  # the verified block's slots
        self.context = torch.zeros(batch_size, context_length, feature_size, dtype=drafter.dtype, device=device)
        self.context_positions = torch.zeros(batch_size, context_length, dtype=torch.long, device=device)
        self.context_offset = torch.zeros((), dtype=torch.long, device=device)
        self.key_length: int | None = None  # see `place`
        super().__init__(device, use_graphs, pool)

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
        context_valid = self.slot_valid[:, :key_length] & (slots < block_start)
        visible = (context_valid | in_block)[:, None, None, :].expand(-1, 1, self.block_size, -1)
        attention_mask = visible
        if self.window_ring is not None:
            # Sliding layers read their ring, which this forward writes: the new context's validity is its slots'.
            context_slots = context_offset + torch.arange(context.shape[1], device=context_offset.device)
            self.window_ring.plan(
                context_positions, self.slot_valid[:, context_slots], self.anchor_positions, self.block_size
            )
            window = self.window_ring.mask(self.anchor_positions, self.block_size, self.row_block_sizes)
            attention_mask = {"full_attention": visible, "sliding_attention": window}
        with static_cache_prefix(self.cache, key_length):
            hidden = self.drafter(
                noise_embeds=self.input_embeddings(layout.input_ids),
                context_hidden_states=context,
                position_ids=torch.cat([context_positions, layout.position_ids], dim=1),
                attention_mask=attention_mask,
                cache=self.cache,
            ).last_hidden_state
        return greedy_proposals(self.lm_head, hidden[:, 1:])


class DecodingWorkspace:
    """Static caches, the slot mask and the captured steps for one target, drafter, batch size and capacity.

    Kept between requests (see `workspace_for`) so that captured CUDA graphs are replayed, not captured again.
    Nothing carries over from one request to the next: `reset` marks every slot empty, and empty slots are never
    attended to.
    """

    def __init__(self, model, drafter, batch_size: int, capacity: int, use_graphs: bool, head=None):
        device = model.device
        self.model, self.drafter, self.batch_size, self.capacity = model, drafter, batch_size, capacity
        self.max_block_size = drafter.config.max_block_size
        self.use_graphs = use_graphs
        self.target_cache = new_static_cache(model.config, capacity)
        # The drafter writes a verified block's context at the block's own slots and its draft block right after.
        self.drafter_cache = new_static_cache(drafter.config, capacity + self.max_block_size)
        # Sliding draft layers keep only their window, by position (`window_cache`); full ones every slot.
        self.window_ring = None
        if "sliding_attention" in drafter.config.layer_types:
            self.window_ring = WindowRing(batch_size, drafter.config.sliding_window, self.max_block_size, device)
            window_layers(self.drafter_cache, drafter.config.layer_types, self.window_ring)
        self.slot_valid = torch.zeros(batch_size, capacity + self.max_block_size, dtype=torch.bool, device=device)
        self.row_block_sizes = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Shared by every block size's draft step (and, through `head`, by other workspaces of the same models).
        self.draft_head = head if head is not None else draft_head(model, drafter)
        self.pool = torch.cuda.graph_pool_handle() if use_graphs and torch.cuda.is_available() else None
        self._steps = {}

    def steps(self, block_size: int, copy_tokens: int = 0) -> tuple[VerifyStep, "DraftStep"]:
        """The verify and draft steps of drafter blocks of `block_size` tokens, verified with `copy_tokens` copied
        ones as a second chain (`tree.VerifyTree`)."""
        key = (block_size, copy_tokens)
        if key not in self._steps:
            layer_ids = self.drafter.config.target_layer_ids
            tree = VerifyTree(block_size - 1, copy_tokens)
            verify = VerifyStep(
                self.model,
                self.target_cache,
                self.slot_valid,
                layer_ids,
                self.batch_size,
                tree,
                self.use_graphs,
                self.pool,
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
                self.window_ring,
                context_length=tree.length,
            )
            self._steps[key] = (verify, draft)
        return self._steps[key]

    def reset(self, prompt_mask: torch.Tensor) -> None:
        self.slot_valid.zero_()
        self.slot_valid[:, : prompt_mask.shape[1]] = prompt_mask
        if self.window_ring is not None:
            self.window_ring.reset()

    def prefill(self, input_ids, position_ids, layer_ids):
        """The prompt into slots `0...`: returns `(last logits, context features, last hidden state)`, its linear
        products in the same form as the steps'."""
        offset = torch.zeros((), dtype=torch.long, device=input_ids.device)
        with decoding_linear_form(input_ids.device)():
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
        if self.window_ring is not None:
            self.window_ring.take_rows(source.window_ring, rows)

    def compact(self) -> int:
        """Move every sequence's valid slots to the front of both caches (order kept); returns the new offset. A
        sliding draft layer's ring is keyed by position, so it stays as it is."""
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
        # A drafter's copy of the LM head (see `draft_head`) is as large as the head: one per pair of models.
        sibling = next((w for k, w in workspaces.items() if k[:3] == key[:3] and w.drafter is drafter), None)
        if len(workspaces) >= _MAX_WORKSPACES_PER_TARGET:
            workspaces.pop(next(iter(workspaces)))
        head = sibling.draft_head if sibling else None
        workspace = workspaces[key] = DecodingWorkspace(model, drafter, batch_size, capacity, use_graphs, head)
    return workspace


def cached_workspaces(model) -> dict:
    """The workspaces kept on `model` (see `workspace_for`), keyed by models and shapes; empty before any request."""
    return model.__dict__.get("_blockpilot_workspaces", {})


def cache_capacity(prompt_length: int, max_new_tokens: int, block_size: int, batch_size: int) -> int:
    """Slots per cache: the prompt, every new token, a block of look-ahead and, for batches, room for holes before
    a compaction is needed. Rounded up to 256 so that requests of similar length share captured graphs."""
    needed = prompt_length + max_new_tokens + 2 * block_size + (max_new_tokens if batch_size > 1 else 0)
    return -(-needed // 256) * 256
