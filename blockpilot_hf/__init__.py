"""blockpilot_hf: lossless block-diffusion speculative decoding (DFlash) with an instance-adaptive block size
(BlockPilot), as a transformers generation extension.

    import blockpilot_hf
    blockpilot_hf.enable(target)
    out = target.generate(input_ids, assistant_model=drafter, block_policy=policy, max_new_tokens=256)

Importing the package registers `DFlashDrafterConfig`/`DFlashDrafter` and `BlockPolicyConfig`/`BlockPolicy` with
`AutoConfig`/`AutoModel`.
"""

from .configuration import BlockPolicyConfig, DFlashDrafterConfig
from .decoding import BlockPilotGenerateOutput, enable, speculative_generate
from .modeling_drafter import DFlashDrafter
from .modeling_policy import BlockPolicy
from .version import __version__

__all__ = [
    "BlockPilotGenerateOutput",
    "BlockPolicy",
    "BlockPolicyConfig",
    "DFlashDrafter",
    "DFlashDrafterConfig",
    "__version__",
    "enable",
    "load_default",
    "speculative_generate",
]


def __getattr__(name):
    # The default model loader pulls in tokenizers/gguf handling; load it only when asked for.
    if name == "load_default":
        from .default_model import load_default

        return load_default
    raise AttributeError(f"module 'blockpilot_hf' has no attribute {name!r}")
