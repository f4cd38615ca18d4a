"""Lossless block-diffusion speculative decoding inside `model.generate`, for batches of any size.

The modules, in the order a request meets them:

- `requests`  - what a request must satisfy, and how its block sizes, backend and stopping rule resolve;
- `workspace` - preallocated caches, the slot mask and the fixed-shape draft and verify steps (CUDA graphs on GPU);
- `steps`     - the pure pieces of a step: picks, the accepted prefix, logits processing, the target's block forward;
- `loop`      - `speculative_generate`, the loop itself (block, verify, accept, commit, draft);
- `enable`    - `enable(model)`, so that `model.generate(..., assistant_model=drafter)` reaches the loop.

Users reach the loop two ways: `blockpilot_hf.enable(target)` then `target.generate(..., assistant_model=drafter)`,
or without touching the instance, `target.generate(..., custom_generate=speculative_generate, drafter=drafter)`.
"""

from ..cuda_graphs import StepGraph
from .enable import enable
from .loop import BlockPilotGenerateOutput, CommittedTokens, SpeculativeBatch, speculative_generate
from .requests import BlockSizePolicy, check_drafter_matches_target, resolve_backend, resolve_block_sizes
from .steps import (
    accepted_prefix_length,
    additive_mask,
    process_block_scores,
    processors_per_row,
    select_tokens,
    target_block_forward,
)
from .workspace import (
    DecodingWorkspace,
    DraftStep,
    FixedShapeStep,
    VerifyStep,
    cache_capacity,
    cached_workspaces,
    workspace_for,
)

__all__ = [
    "BlockPilotGenerateOutput",
    "BlockSizePolicy",
    "CommittedTokens",
    "DecodingWorkspace",
    "DraftStep",
    "FixedShapeStep",
    "SpeculativeBatch",
    "StepGraph",
    "VerifyStep",
    "accepted_prefix_length",
    "additive_mask",
    "cache_capacity",
    "cached_workspaces",
    "check_drafter_matches_target",
    "enable",
    "process_block_scores",
    "processors_per_row",
    "resolve_backend",
    "resolve_block_sizes",
    "select_tokens",
    "speculative_generate",
    "target_block_forward",
    "workspace_for",
]
