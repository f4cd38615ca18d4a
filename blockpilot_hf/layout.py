"""The block layout: the one definition of what a draft block is, shared by decoding and training.

A block anchored at position `p` is the token sequence `[x_p, MASK, ..., MASK]` (`block_size` tokens) placed at the
absolute positions `p, p+1, ..., p+block_size-1`. Block position `k` is trained to predict `x_{p+k}`; position 0 (the
anchor, already known) is never a prediction. A block's queries see

* the target's context features of every position `< p` (the tokens committed before the anchor), and
* every position of their own block, bidirectionally,

and nothing else: during training many blocks share one forward pass and never see each other. At decoding time there
is exactly one block whose context is everything committed so far, so the mask is all-visible and is dropped.

A drafter with sliding-window layers (`DFlashDrafterConfig.layer_types`) narrows the context of those layers: a block
query at position `q` sees only the context positions `> q - sliding_window`. Its training layout then carries one
mask per layer type.
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class BlockLayout:
    """Inputs of one drafter forward for `num_blocks` blocks per sequence (flattened block-major on the sequence axis).

    Attributes:
        input_ids (`torch.LongTensor` of shape `(batch, num_blocks * block_size)`): `[anchor, MASK...]` per block.
        position_ids (`torch.LongTensor` of shape `(batch, num_blocks * block_size)`): absolute block positions.
        attention_mask (`torch.BoolTensor` of shape `(batch, 1, num_blocks * block_size, context_length + num_blocks * block_size)`,
            a `dict` of them by layer type, or `None`): `True` where a block query may attend to a key (context keys
            first, then block keys). `None` means every key is visible, the decoding case; a dict (`"full_attention"`,
            `"sliding_attention"`) is what a layout with a `sliding_window` gives; with `block_sparse`, the masks
            are `BlockSparseMask`s.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    attention_mask: "torch.BoolTensor | BlockSparseMask | dict | None"
    block_size: int


@dataclass
class BlockSparseMask:
    """The training mask in its compact form: which context keys each block query sees; block keys are visible from
    their own block only. Attention then scores `context_length + block_size` keys per query instead of
    `context_length + num_blocks * block_size` (`modeling_drafter.block_sparse_attention`), with the same result.

    Attributes:
        context_visible (`torch.BoolTensor` of shape `(batch, 1, num_blocks * block_size, context_length)`).
        block_size (`int`).
    """

    context_visible: torch.BoolTensor
    block_size: int

    def dense(self) -> torch.BoolTensor:
        """The same mask over every key, `(batch, 1, queries, context_length + queries)`."""
        batch, _, queries, _ = self.context_visible.shape
        blocks = torch.arange(queries, device=self.context_visible.device) // self.block_size
        same_block = (blocks[:, None] == blocks[None, :]).expand(batch, 1, -1, -1)
        return torch.cat([self.context_visible, same_block], dim=-1)


def build_block_layout(
    anchor_ids: torch.LongTensor,
    anchor_positions: torch.LongTensor,
    block_size: int,
    mask_token_id: int,
    context_positions: torch.LongTensor | None = None,
    context_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_sparse: bool = False,
) -> BlockLayout:
    """Build the drafter inputs for blocks anchored at `anchor_positions`.

    Args:
        anchor_ids (`torch.LongTensor` of shape `(batch, num_blocks)`): the token at each anchor position.
        anchor_positions (`torch.LongTensor` of shape `(batch, num_blocks)`): absolute position of each anchor.
        block_size (`int`): tokens per block, anchor included.
        mask_token_id (`int`): token filling the masked block positions.
        context_positions (`torch.LongTensor` of shape `(batch, context_length)`, *optional*): absolute positions of
            the context keys the blocks attend to. `None` means "all context precedes every anchor" (decoding).
        context_padding_mask (`torch.Tensor` of shape `(batch, context_length)`, *optional*): 1 for real context keys,
            0 for padding.
        sliding_window (`int`, *optional*): the window of the drafter's sliding layers; needs `context_positions`.
            The mask then comes per layer type.
        block_sparse (`bool`): the mask as a `BlockSparseMask` (training: attention skips the scores between
            different blocks) instead of a dense boolean tensor.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    batch_size, num_blocks = anchor_ids.shape
    offsets = torch.arange(block_size, device=anchor_ids.device)
    input_ids = anchor_ids.new_full((batch_size, num_blocks, block_size), mask_token_id)
    input_ids[:, :, 0] = anchor_ids
    position_ids = anchor_positions[:, :, None] + offsets

    attention_mask = None
    if num_blocks > 1 or context_positions is not None or context_padding_mask is not None:
        # Context key j is visible from block a iff it lies strictly before a's anchor (and is not padding).
        if context_positions is None:
            context_visible = torch.ones(batch_size, num_blocks, 0, dtype=torch.bool, device=anchor_ids.device)
            if context_padding_mask is not None:
                context_visible = context_padding_mask.bool()[:, None, :].expand(batch_size, num_blocks, -1)
        else:
            context_visible = context_positions[:, None, :] < anchor_positions[:, :, None]
            if context_padding_mask is not None:
                context_visible = context_visible & context_padding_mask.bool()[:, None, :]
        # Per query; block keys are visible only within their own block (`BlockSparseMask`).
        per_query = context_visible.repeat_interleave(block_size, dim=1)[:, None]
        masks = {"full_attention": per_query}
        if sliding_window is not None:
            if context_positions is None:
                raise ValueError("A layout with a `sliding_window` needs the `context_positions` it is measured in.")
            queries = position_ids.reshape(batch_size, num_blocks * block_size)
            recent = context_positions[:, None, :] > queries[:, :, None] - sliding_window
            masks["sliding_attention"] = per_query & recent[:, None]
        masks = {kind: BlockSparseMask(visible, block_size) for kind, visible in masks.items()}
        if not block_sparse:
            masks = {kind: mask.dense() for kind, mask in masks.items()}
        attention_mask = masks if sliding_window is not None else masks["full_attention"]

    return BlockLayout(
        input_ids=input_ids.reshape(batch_size, num_blocks * block_size),
        position_ids=position_ids.reshape(batch_size, num_blocks * block_size),
        attention_mask=attention_mask,
        block_size=block_size,
    )


def block_labels(
    input_ids: torch.LongTensor,
    anchor_positions: torch.LongTensor,
    block_size: int,
    loss_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Targets of every block position: `x_{p+k}` for block position k, `IGNORE_INDEX` for the anchor (k = 0), for
    positions past the end of the sequence and for positions the loss mask excludes (e.g. prompt tokens, padding).

    Returns a `torch.LongTensor` of shape `(batch, num_blocks, block_size)`.
    """
    seq_len = input_ids.shape[1]
    positions = anchor_positions[:, :, None] + torch.arange(block_size, device=input_ids.device)
    in_range = positions < seq_len
    gathered = torch.gather(input_ids, 1, positions.clamp(max=seq_len - 1).flatten(1)).view_as(positions)
    valid = in_range.clone()
    valid[:, :, 0] = False
    if loss_mask is not None:
        valid &= torch.gather(loss_mask.bool(), 1, positions.clamp(max=seq_len - 1).flatten(1)).view_as(positions)
    return torch.where(valid, gathered, torch.full_like(gathered, IGNORE_INDEX))


def block_loss_weights(block_size: int, gamma: float | None = None, device=None) -> torch.Tensor:
    """Per-position loss weights `w_k = exp(-(k-1)/gamma)` for k >= 1 and 0 for the anchor.

    Early block positions matter most: a miss at position k discards every later proposal. `gamma` defaults to the
    DFlash value scaled with the block size (7 for B = 16).
    """
    gamma = gamma if gamma is not None else 7.0 * block_size / 16.0
    k = torch.arange(block_size, dtype=torch.float32, device=device)
    weights = torch.exp(-(k - 1).clamp(min=0) / gamma)
    weights[0] = 0.0
    return weights
