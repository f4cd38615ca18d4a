"""blockpilot_hf: lossless block-diffusion speculative decoding (DFlash) with an instance-adaptive block size
(BlockPilot), as a transformers generation extension.

    import blockpilot_hf
    blockpilot_hf.enable(target)
    out = target.generate(input_ids, assistant_model=drafter, block_policy=policy, max_new_tokens=256)

Importing the package registers `DFlashDrafterConfig`/`DFlashDrafter` and `BlockPolicyConfig`/`BlockPolicy` with
`AutoConfig`/`AutoModel`.
"""

from .configuration import BlockPolicyConfig, DFlashDrafterConfig
from .cpu_linear import MeasuredLinear, PackedLinear, release_packed_weights
from .decoding import BlockPilotGenerateOutput, BlockSizePolicy, enable, speculative_generate
from .features import PrefillRepresentation
from .modeling_drafter import DFlashDrafter, drafter_dtype_for
from .modeling_policy import BlockPolicy
from .training.data import chat_prompt_ids
from .version import __version__

# The public API. Everyday use needs `enable`, a drafter and a policy; a policy of your own implements
# `BlockSizePolicy` over a `PrefillRepresentation`; `MeasuredLinear` runs plain CPU decoding in the product form the
# speculative steps use (the fair baseline), `PackedLinear` with every product packed; `chat_prompt_ids` tokenizes a
# request the way training and the benchmark do.
__all__ = [
    "BlockPilotGenerateOutput",
    "BlockPolicy",
    "BlockPolicyConfig",
    "BlockSizePolicy",
    "DFlashDrafter",
    "DFlashDrafterConfig",
    "MeasuredLinear",
    "PackedLinear",
    "PrefillRepresentation",
    "__version__",
    "chat_prompt_ids",
    "drafter_dtype_for",
    "enable",
    "load_default",
    "release_packed_weights",
    "speculative_generate",
]


def __getattr__(name):
    # The default model loader pulls in tokenizers/gguf handling; load it only when asked for.
    if name == "load_default":
        from .default_model import load_default

        return load_default
    raise AttributeError(f"module 'blockpilot_hf' has no attribute {name!r}")
