"""The drafter's sliding-window layers keep only their window: per sequence, a ring of cache entries addressed by
position, so a long context costs those layers `window + max_block_size` keys, not one key per token.

A sliding draft layer's block queries (anchor at position `p`, queries at `p ... p+B-1`) see the context positions
`> q - window` before the anchor and their own block (`configuration.DFlashDrafterConfig.layer_types`). Everything one
step can read therefore lies in `p - window + 1 ... p + B - 1`: at most `window + max_block_size` distinct positions,
so position `t` can live at entry `t % size` of its sequence's ring. Writes that must not land (left padding, rejected
drafts, context older than the window) go to one extra entry, the sink, which is never read.

Entries are keyed by position, not by cache slot: compacting the slots of the other caches does not touch them, and a
stale entry (one a newer position skipped) is never visible, since its position lies `size` or more behind. The
drafter's full-attention layers keep their slot-numbered static cache; only `WindowLayer`s replace the sliding ones.
"""

import torch


class WindowRing:
    """Which position every ring entry holds, per sequence, and where the next forward's keys are written.

    Shared by all `WindowLayer`s of one drafter cache: `plan` runs once per draft step, before the drafter forward,
    and the layers read `write_index` when the forward writes its keys.
    """

    def __init__(self, batch_size: int, window: int, max_block_size: int, device):
        self.window = window
        self.size = window + max_block_size
        self.sink = self.size
        # -1: empty. The sink's entry stays -1, so no mask ever shows it.
        self.positions = torch.full((batch_size, self.size + 1), -1, dtype=torch.long, device=device)
        self.write_index = torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.positions.fill_(-1)

    def take_rows(self, source: "WindowRing", rows: torch.LongTensor) -> None:
        self.positions.copy_(source.positions[rows])

    def plan(self, context_positions, context_valid, anchor_positions, block_size: int) -> None:
        """This forward writes the valid context entries within the window of the block's anchor, then the block
        (every position of the largest block: a row's mask hides what lies past its own block size).

        Args:
            context_positions (`torch.LongTensor` of shape `(batch, ctx_len)`): positions of the new context features.
            context_valid (`torch.BoolTensor` of shape `(batch, ctx_len)`): which of them are committed tokens.
            anchor_positions (`torch.LongTensor` of shape `(batch, 1)`): position of each block's anchor.
        """
        block_positions = anchor_positions + torch.arange(block_size, device=anchor_positions.device)
        # Older context would share entries with newer positions, and a scatter resolves duplicate indices in no
        # defined order on CUDA: it goes to the sink, like padding and rejected drafts.
        keep = context_valid & (context_positions > anchor_positions - self.window)
        context_index = torch.where(keep, context_positions % self.size, torch.full_like(context_positions, self.sink))
        self.write_index = torch.cat([context_index, block_positions % self.size], dim=1)
        self.positions.scatter_(1, self.write_index, torch.cat([context_positions, block_positions], dim=1))
        self.positions[:, self.sink] = -1

    def mask(self, anchor_positions, block_size: int, row_block_sizes) -> torch.BoolTensor:
        """`(batch, 1, block_size, size + 1)`: `True` where a block query may read a ring entry (after `plan`)."""
        queries = anchor_positions + torch.arange(block_size, device=anchor_positions.device)
        held = self.positions[:, None, :]
        anchor = anchor_positions[:, :, None]
        context = (held >= 0) & (held < anchor) & (held > queries[:, :, None] - self.window)
        own_block = (held >= anchor) & (held < anchor + row_block_sizes[:, None, None])
        return (context | own_block)[:, None]


class WindowLayer:
    """The cache layer of a sliding draft layer: `ring.size + 1` entries per sequence, written where `ring` plans.

    It takes the place of a `transformers` cache layer in the drafter's `StaticCache` (`Cache.update` only calls a
    layer's `update`); the slot-numbered helpers of `compat` leave it alone.
    """

    is_sliding = True

    def __init__(self, ring: WindowRing):
        self.ring = ring
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    def _allocate(self, like: torch.Tensor) -> None:
        batch, heads, _, head_dim = like.shape
        shape = (batch, heads, self.ring.size + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:
            self._allocate(key_states)
        index = self.ring.write_index[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys, self.values

    def take_rows(self, source: "WindowLayer", rows: torch.LongTensor) -> None:
        if source.keys is None:
            return
        if self.keys is None:
            self._allocate(source.keys[rows])
        self.keys.copy_(source.keys[rows])
        self.values.copy_(source.values[rows])


def window_layers(cache, layer_types: list[str], ring: WindowRing) -> None:
    """Give every sliding layer of a drafter's static cache a `WindowLayer` over `ring`, in place."""
    cache.layers = [
        WindowLayer(ring) if layer_type == "sliding_attention" else layer
        for layer, layer_type in zip(cache.layers, layer_types)
    ]
