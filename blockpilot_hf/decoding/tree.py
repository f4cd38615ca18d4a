"""The verify block as a tree: the drafter's chain and the copy chain share the anchor and are verified together.

Slots of a verify block with `draft_tokens = D` and `copy_tokens = C`:

    slot:      0       1 ... D          D+1 ... D+C
    token:     anchor  drafter chain    copy chain
    position:  p       p+1 ... p+D      p+1 ... p+C

A node sees the committed context, itself and its ancestors: the drafter chain never sees the copy chain nor the
copy chain the drafter's. With `copy_tokens = 0` the tree is the plain chain `[anchor, proposals...]` with its causal
mask, so one code path verifies both.

Acceptance walks the tree from the anchor, one node at a time: the target's pick at a node (its argmax, or one sample
of its processed distribution) is committed; if a child proposes that token, the walk descends into it, else it stops.
Where both chains propose the same tokens they are one node of the walk (their prefixes are equal, so are the
target's distributions there), and the pick of that node comes from one fixed slot. Which node comes next then
depends only on the picks already committed, so every committed token is still drawn from the target's processed
distribution given its prefix, as in plain decoding; with greedy decoding the walk commits the longer accepted chain.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class VerifyTree:
    """The shape of one verify block: `draft_tokens` drafter proposals and `copy_tokens` copied ones after the anchor.

    Attributes:
        parents (`tuple[int, ...]`): per slot, the slot of its parent (-1 for the anchor).
        depths (`tuple[int, ...]`): per slot, its position after the anchor's (0 for the anchor).
    """

    draft_tokens: int
    copy_tokens: int = 0
    parents: tuple = field(init=False)
    depths: tuple = field(init=False)

    def __post_init__(self):
        if self.draft_tokens < 0 or self.copy_tokens < 0:
            raise ValueError(f"A verify tree needs counts >= 0; got {self.draft_tokens} and {self.copy_tokens}.")
        draft = [(k - 1, k) for k in range(1, self.draft_tokens + 1)]
        first_copy = self.draft_tokens + 1
        copy = [(0 if j == 1 else first_copy + j - 2, j) for j in range(1, self.copy_tokens + 1)]
        parents, depths = zip(*([(-1, 0)] + draft + copy))
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depths", depths)

    @property
    def length(self) -> int:
        return 1 + self.draft_tokens + self.copy_tokens

    def branch_slots(self, branch: int) -> list[int]:
        """Slots of branch 0 (the drafter's) or 1 (the copy), anchor excluded, in order."""
        first = 1 if branch == 0 else self.draft_tokens + 1
        return list(range(first, first + (self.draft_tokens if branch == 0 else self.copy_tokens)))

    def path(self, slot: int) -> list[int]:
        """The slots from the anchor's first child down to `slot` (empty for the anchor)."""
        slots = []
        while slot > 0:
            slots.append(slot)
            slot = self.parents[slot]
        return slots[::-1]

    def visibility(self, device=None) -> torch.BoolTensor:
        """`(length, length)`: `True` where the node of a row's slot may attend to the node of a column's slot."""
        visible = torch.eye(self.length, dtype=torch.bool, device=device)
        for slot in range(1, self.length):
            visible[slot, [0] + self.path(slot)] = True
        return visible

    def position_offsets(self, device=None) -> torch.LongTensor:
        return torch.tensor(self.depths, dtype=torch.long, device=device)


def walk(branches: list[list[int]], pick_at, first_slots: list[int]) -> tuple[list[int], list[int]]:
    """Acceptance in a tree of chains that share the anchor.

    Args:
        branches (`list[list[int]]`): each chain's proposals, already cut to what may be accepted.
        pick_at (`Callable[[int], int]`): the target's pick (argmax or sample) at a slot.
        first_slots (`list[int]`): the slot of each chain's first proposal (its k-th sits `k` slots later).

    Returns:
        `(tokens, slots)`: the committed tokens (accepted proposals, then the target's pick after them) and, for
        each, the slot whose cache entry holds it (the anchor's slot 0 first, then one slot per accepted proposal).
    """
    alive = [b for b, proposals in enumerate(branches) if proposals]
    tokens, slots, depth, slot = [], [0], 0, 0
    while True:
        pick = pick_at(slot)
        tokens.append(pick)
        alive = [b for b in alive if depth < len(branches[b]) and branches[b][depth] == pick]
        if not alive:
            return tokens, slots
        slot = first_slots[alive[0]] + depth  # the node's pick comes from the first chain still on the walk
        slots.append(slot)
        depth += 1
