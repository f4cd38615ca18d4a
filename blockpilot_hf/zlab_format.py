"""z-lab's DFlash checkpoint format: `architectures: ["DFlashDraftModel"]`, a Qwen3-style config with
`dflash_config: {mask_token_id, target_layer_ids}`, loaded elsewhere only with `trust_remote_code`.

Weight names already match ours (`modeling_drafter.py`), so only the config is converted, both ways.
"""

import json
import os

from safetensors.torch import save_file
from transformers.utils import cached_file

from .configuration import DFlashDrafterConfig


def read_zlab_config(name_or_path, kwargs) -> DFlashDrafterConfig | None:
    """Convert a z-lab `DFlashDraftModel` config.json to ours; `None` if the checkpoint is not in that format."""

    try:
        config_file = cached_file(
            name_or_path,
            "config.json",
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
            local_files_only=kwargs.get("local_files_only", False),
            token=kwargs.get("token"),
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError:
        return None  # let from_pretrained raise its own (clearer) error
    if config_file is None:
        return None
    with open(config_file) as f:
        raw = json.load(f)
    if (
        "DFlashDraftModel" not in (raw.get("architectures") or [])
        or raw.get("model_type") == DFlashDrafterConfig.model_type
    ):
        return None
    dflash = raw.get("dflash_config") or {}
    if dflash.get("mask_token_id") is None:
        raise ValueError(
            f"{name_or_path!r} is a z-lab DFlash checkpoint without `dflash_config.mask_token_id`; "
            "set it in its config.json to the mask token the drafter was trained with."
        )
    rope = raw.get("rope_parameters") or {}
    num_layers = raw["num_hidden_layers"]
    num_target_layers = raw.get("num_target_layers")
    if num_target_layers is None:
        raise ValueError(f"{name_or_path!r}: z-lab config lacks `num_target_layers`.")
    return DFlashDrafterConfig(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        head_dim=raw.get("head_dim"),
        hidden_act=raw.get("hidden_act", "silu"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", raw.get("rope_theta", 1000000.0)),
        attention_bias=raw.get("attention_bias", False),
        use_qk_norm=True,  # Qwen3-style layers: z-lab weights always carry q_norm / k_norm
        block_size=raw.get("block_size", 16),
        max_block_size=max(64, raw.get("block_size", 16)),
        target_layer_ids=dflash.get("target_layer_ids"),
        num_target_layers=num_target_layers,
        target_hidden_size=raw["hidden_size"],
        target_vocab_size=raw.get("vocab_size"),
        target_model_type=raw.get("model_type"),
        mask_token_id=dflash["mask_token_id"],
        # Since 2026-04 z-lab drafts may mix sliding-window layers in (Qwen3-style `layer_types`).
        layer_types=raw.get("layer_types"),
        sliding_window=raw.get("sliding_window") if "sliding_attention" in (raw.get("layer_types") or []) else None,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )


def save_zlab_format(drafter, save_directory: str | os.PathLike) -> None:
    """Write `drafter` the way z-lab publishes DFlash drafts (Qwen3-style config + `dflash_config`), e.g. for peers
    that only read that format."""

    os.makedirs(save_directory, exist_ok=True)
    c = drafter.config
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "attention_bias": c.attention_bias,
        "vocab_size": c.target_vocab_size,
        "block_size": c.block_size,
        "num_target_layers": c.num_target_layers,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)},
        "layer_types": list(c.layer_types),
        "sliding_window": c.sliding_window,
    }
    with open(os.path.join(save_directory, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
