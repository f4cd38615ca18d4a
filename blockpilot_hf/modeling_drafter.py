"""The DFlash block-diffusion drafter, in one file, plain PyTorch.

The drafter denoises a whole block `[anchor, MASK, ..., MASK]` in one forward pass. It has no embedding table and no
LM head: block tokens are embedded with the target's input embedding and draft logits come from the target's LM head.
What it adds is a handful of decoder layers whose keys and values are `cat([context, block])`, where `context` is a
fused projection of several target layers' hidden states at the committed positions. Attention is non-causal: the
block sees all committed context and itself in both directions.

Weight names follow the z-lab DFlash checkpoints (`fc`, `hidden_norm`, `layers.N.self_attn.q_proj`, ..., `norm`), so
those checkpoints load without renaming; only their config is converted (see `DFlashDrafter.from_pretrained`).
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .compat import output_cache_kwargs
from .configuration import DFlashDrafterConfig
from .layout import BlockSparseMask
from .zlab_format import read_zlab_config, save_zlab_format  # noqa: F401  (save_zlab_format: its old home)

logger = logging.get_logger(__name__)


class DFlashRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DFlashRotaryEmbedding(nn.Module):
    """Default RoPE. The drafter's rotary base is its own; it does not need to match the target's scaling."""

    def __init__(self, config: DFlashDrafterConfig):
        super().__init__()
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 angles, whatever the model dtype
            freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """RoPE where keys (context + block) are longer than queries (block only): queries take the last positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_len = q.shape[-2]
    q_embed = (q * cos[..., -q_len:, :]) + (rotate_half(q) * sin[..., -q_len:, :])
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def block_sparse_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockSparseMask,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of many blocks in one forward (training) without the scores between different blocks, which the
    mask hides anyway: each query scores its visible context keys and the keys of its own block.

    `key` / `value` hold the context keys first, then the blocks' (`layout.build_block_layout`); shapes as in
    `eager_attention_forward`, whose output this equals.
    """
    batch, heads, queries, head_dim = query.shape
    kv_heads, block = key.shape[1], attention_mask.block_size
    context, blocks, groups = key.shape[2] - queries, queries // block, heads // kv_heads
    # Scaled before the products: the query is ~10x smaller than the scores of a long context.
    query = (query * scaling).view(batch, kv_heads, groups, queries, head_dim)  # heads sharing a key head side by side
    context_keys, context_values = key[:, :, None, :context], value[:, :, None, :context]
    block_keys = key[:, :, None, context:].reshape(batch, kv_heads, 1, blocks, block, head_dim)
    block_values = value[:, :, None, context:].reshape(batch, kv_heads, 1, blocks, block, head_dim)

    context_scores = torch.matmul(query, context_keys.transpose(-1, -2))
    visible = attention_mask.context_visible.view(batch, 1, 1, queries, context)
    context_scores = context_scores.masked_fill(~visible, torch.finfo(context_scores.dtype).min)
    per_block = query.view(batch, kv_heads, groups, blocks, block, head_dim)
    block_scores = torch.matmul(per_block, block_keys.transpose(-1, -2))
    scores = torch.cat([context_scores, block_scores.reshape(batch, kv_heads, groups, queries, block)], dim=-1)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)

    output = torch.matmul(weights[..., :context], context_values)
    in_block = weights[..., context:].reshape(batch, kv_heads, groups, blocks, block, block)
    output = output + torch.matmul(in_block, block_values).reshape(batch, kv_heads, groups, queries, head_dim)
    return output.reshape(batch, heads, queries, head_dim).transpose(1, 2).contiguous()


class DFlashMLP(nn.Module):
    def __init__(self, config: DFlashDrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DFlashAttention(nn.Module):
    """Queries from the block only; keys and values from `cat([context, block])`; no causal mask."""

    def __init__(self, config: DFlashDrafterConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm:
            self.q_norm = DFlashRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DFlashRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        batch_size, q_len, _ = hidden_states.shape
        kv_input = torch.cat([context, hidden_states], dim=1)
        query = self.q_norm(self.q_proj(hidden_states).view(batch_size, q_len, -1, self.head_dim)).transpose(1, 2)
        key = self.k_norm(self.k_proj(kv_input).view(batch_size, kv_input.shape[1], -1, self.head_dim)).transpose(1, 2)
        value = self.v_proj(kv_input).view(batch_size, kv_input.shape[1], -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            # The cache stores keys after k_norm and RoPE; the caller drops the block's entries afterwards.
            key, value = cache.update(key, value, self.layer_idx)

        dropout = 0.0 if not self.training else self.attention_dropout
        if isinstance(attention_mask, BlockSparseMask):
            attn_output = block_sparse_attention(self, query, key, value, attention_mask, self.scaling, dropout)
            return self.o_proj(attn_output.reshape(batch_size, q_len, -1))
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation not in (None, "eager"):
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(attn_output.reshape(batch_size, q_len, -1).contiguous())


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashDrafterConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = DFlashMLP(config)
        self.input_layernorm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, context, position_embeddings, attention_mask=None, cache=None) -> torch.Tensor:
        # The fused context enters every layer unchanged: it is not normed here and produces no queries.
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, context, position_embeddings, attention_mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DFlashPreTrainedModel(PreTrainedModel):
    config_class = DFlashDrafterConfig
    base_model_prefix = "drafter"
    main_input_name = "noise_embeds"
    _no_split_modules = ["DFlashDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, DFlashRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DFlashRotaryEmbedding):
            config = self.config
            module.inv_freq.copy_(
                1.0
                / (
                    config.rope_theta
                    ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim)
                )
            )


class DFlashDrafter(DFlashPreTrainedModel):
    """A DFlash drafter. Build one for a target with [`DFlashDrafter.from_target`], load one with `from_pretrained`
    (our format or z-lab's), and hand it to `target.generate(..., assistant_model=drafter)` after
    `blockpilot_hf.enable(target)`.
    """

    def __init__(self, config: DFlashDrafterConfig):
        super().__init__(config)
        self.fc = nn.Linear(config.context_feature_size, config.hidden_size, bias=False)
        self.hidden_norm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DFlashRotaryEmbedding(config)
        if config.draft_vocab_size is not None:
            # The target ids the drafter may propose: set by `set_draft_vocabulary`, loaded with the weights
            # (`from_pretrained` refuses a checkpoint without them).
            self.register_buffer("draft_token_ids", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.post_init()

    @property
    def generation_config(self):
        # Stock assisted decoding treats an assistant as a small causal LM and reads its generation config first;
        # a drafter cannot serve that path, so say what to do instead of failing deep inside transformers.
        raise ValueError(
            "A DFlashDrafter is not a standalone causal LM, so stock assisted decoding cannot use it. Call "
            "`blockpilot_hf.enable(target)` before `target.generate(..., assistant_model=drafter)`, or use "
            "`custom_generate=blockpilot_hf.speculative_generate, drafter=drafter`, or transformers' own path with "
            '`speculation_type="dflash"`.'
        )

    def set_draft_vocabulary(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Propose only `token_ids` (target ids), e.g. the most frequent tokens of the drafter's training data
        (`blockpilot draft-vocab`). Proposals are scored with just those rows of the target's LM head, which on CPU is
        most of a draft step (measurements: docs/performance.md). Verification is untouched, so outputs do not
        change; a token outside the
        vocabulary is never proposed, only generated by the target. `None` restores the whole vocabulary. Saved with
        the drafter."""
        if token_ids is None:
            self._buffers.pop("draft_token_ids", None)
            self.config.draft_vocab_size = None
            return
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        check_draft_vocabulary(token_ids, self.config)
        self.config.draft_vocab_size = len(token_ids)
        self.register_buffer("draft_token_ids", token_ids.to(self.device))

    def fuse_context(self, context_hidden_states: torch.Tensor) -> torch.Tensor:
        """`RMSNorm(fc(concat of target layers))`: one context shared by every draft layer."""
        return self.hidden_norm(self.fc(context_hidden_states))

    def forward(
        self,
        noise_embeds: torch.Tensor,
        context_hidden_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            noise_embeds (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`): target embeddings of the block(s)
                `[anchor, MASK, ...]` (see `blockpilot_hf.layout.build_block_layout`). The output comes back in their
                dtype.
            context_hidden_states (`torch.FloatTensor` of shape `(batch, ctx_len, len(target_layer_ids) * target_hidden_size)`,
                *optional*): raw concatenated target features of context positions not yet in `cache`.
            position_ids (`torch.LongTensor` of shape `(batch, ctx_len + q_len)`): absolute positions of the new context
                keys followed by the block positions. Defaults to consecutive positions after the cache.
            attention_mask (`torch.Tensor`, `BlockSparseMask` or `dict`, *optional*): either a 4D boolean mask
                `(batch, 1, q_len, keys)` over every key (`True` = visible) or its compact `BlockSparseMask`, as
                `build_block_layout` makes them for training, or a 2D padding mask
                `(batch, keys)` over every key including cached ones (1 = real token), or `{layer type: 4D mask}` for
                a drafter with sliding-window layers (`config.layer_types`). `None`: everything visible.
            cache / past_key_values (`transformers.Cache`, *optional*): draft KV cache; both names are accepted since
                transformers renamed the keyword. The caller drops the block's entries afterwards (crops a dynamic
                cache, moves a static one's write slot back).
        """
        cache = cache if cache is not None else past_key_values
        if noise_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"noise_embeds has width {noise_embeds.shape[-1]} but the drafter expects {self.config.hidden_size}: "
                "embed the block with the target's input embedding."
            )
        batch_size, q_len, _ = noise_embeds.shape
        if context_hidden_states is None:
            context_hidden_states = noise_embeds.new_zeros(batch_size, 0, self.config.context_feature_size)
        context = self.fuse_context(context_hidden_states.to(self.fc.weight.dtype))
        new_kv_len = context.shape[1] + q_len
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + new_kv_len, device=noise_embeds.device).expand(batch_size, -1)
        if position_ids.shape[-1] != new_kv_len:
            raise ValueError(
                f"position_ids covers {position_ids.shape[-1]} positions but context + block have {new_kv_len}."
            )
        if isinstance(attention_mask, dict):
            masks = [attention_mask[layer_type] for layer_type in self.config.layer_types]
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            if bool(attention_mask.all()):
                attention_mask = None  # nothing to hide: let the attention kernel run unmasked
            else:
                attention_mask = attention_mask.bool()[:, None, None, :].expand(batch_size, 1, q_len, -1)
        if not isinstance(attention_mask, dict):
            masks = [attention_mask] * len(self.layers)

        hidden_states = noise_embeds.to(self.fc.weight.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer, mask in zip(self.layers, masks):
            hidden_states = layer(hidden_states, context, position_embeddings, mask, cache)
        # Back in the dtype of `noise_embeds` (the target's), so the target's LM head can score the block whatever dtype
        # the drafter runs in (transformers' own DFlash path applies it as is).
        hidden_states = self.norm(hidden_states).to(noise_embeds.dtype)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, **output_cache_kwargs(BaseModelOutputWithPast, cache)
        )

    # ------------------------------------------------------------------ construction and loading

    @classmethod
    def from_target(
        cls,
        target: PreTrainedModel,
        num_layers: int = 2,
        block_size: int = 16,
        mask_token_id: int | None = None,
        target_layer_ids: list[int] | None = None,
        intermediate_size: int | None = None,
        **config_overrides,
    ) -> "DFlashDrafter":
        """A freshly initialised drafter sized for `target` (its width, attention geometry and vocabulary)."""
        tc = target.config.get_text_config()
        if mask_token_id is None:
            raise ValueError(
                "DFlashDrafter.from_target needs `mask_token_id`: a token the target never produces in normal text. "
                "Use `blockpilot_hf.modeling_drafter.choose_mask_token_id(tokenizer)` or add one with "
                "`tokenizer.add_special_tokens({'mask_token': '<|mask|>'})` and `target.resize_token_embeddings(len(tokenizer))`."
            )
        rope = getattr(tc, "rope_parameters", None) or {}
        special_tokens = {name: getattr(tc, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = DFlashDrafterConfig(
            hidden_size=tc.hidden_size,
            intermediate_size=intermediate_size or tc.intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            hidden_act=getattr(tc, "hidden_act", "silu"),
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0)),
            block_size=block_size,
            max_block_size=max(64, block_size),
            target_layer_ids=target_layer_ids,
            num_target_layers=tc.num_hidden_layers,
            target_hidden_size=tc.hidden_size,
            target_vocab_size=target.get_input_embeddings().weight.shape[0],
            target_model_type=tc.model_type,
            target_name_or_path=getattr(target.config, "_name_or_path", None) or None,
            mask_token_id=mask_token_id,
            **{**special_tokens, **config_overrides},
        )
        drafter = cls(config)
        # The drafter's output feeds the target's LM head. At initialisation every block position outputs roughly the
        # (normalised) mask embedding, which the tied LM head scores with huge margins: with unit norm weights the
        # first loss on SmolLM2 is ~94 instead of ~11, and training wastes its first hundreds of steps undoing that.
        # Start the final norm at the target's per-channel pattern, scaled down so the first logits are near-uniform.
        target_norm = getattr(target.base_model, "norm", None)
        with torch.no_grad():
            if (
                getattr(target_norm, "weight", None) is not None
                and target_norm.weight.shape == drafter.norm.weight.shape
            ):
                drafter.norm.weight.copy_(0.05 * target_norm.weight.float())
            else:
                drafter.norm.weight.fill_(0.05)
        return drafter.to(device=target.device, dtype=target.dtype)

    @torch.no_grad()
    def copy_target_layers(self, target: PreTrainedModel, target_layer_indices: list[int]) -> None:
        """Start draft layer i from target layer `target_layer_indices[i]`: every weight the two share by name and
        shape (attention and MLP projections, both norms); the rest (e.g. `q_norm`, `k_norm`) keeps its init."""
        target_layers = target.base_model.layers
        if len(target_layer_indices) != len(self.layers):
            raise ValueError(
                f"{len(target_layer_indices)} target layers given for {len(self.layers)} draft layers: give one each."
            )
        for draft_layer, index in zip(self.layers, target_layer_indices):
            if not 0 <= index < len(target_layers):
                raise ValueError(f"Target layer {index} does not exist: the target has {len(target_layers)} layers.")
            source = dict(target_layers[index].named_parameters())
            copied = 0
            for name, param in draft_layer.named_parameters():
                if name in source and source[name].shape == param.shape:
                    param.copy_(source[name])
                    copied += 1
            if copied == 0:
                raise ValueError(
                    f"Target layer {index} ({type(target_layers[index]).__name__}) shares no weight names with a draft "
                    "layer: start this drafter from its own initialisation."
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a drafter saved by this library or a z-lab DFlash checkpoint (converted on load, no remote code).

        Refuses checkpoints with missing or unexpected weights: a half-loaded drafter would only ever draft noise.
        """
        if kwargs.get("config") is None:
            zlab_config = read_zlab_config(pretrained_model_name_or_path, kwargs)
            if zlab_config is not None:
                kwargs["config"] = zlab_config
        kwargs["output_loading_info"] = True
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as err:
            raise OSError(
                f"Could not load a DFlash drafter from {pretrained_model_name_or_path!r}: {err}\n"
                "If this is a Hub id and you are offline, download it once with `huggingface-cli download` (or set "
                "HF_HUB_OFFLINE=1 with a populated cache); if it is a directory, it needs config.json and "
                "model.safetensors written by `save_pretrained`."
            ) from err
        except Exception as err:  # safetensors header/shape errors arrive as assorted types
            raise ValueError(
                f"The drafter checkpoint at {pretrained_model_name_or_path!r} is corrupt or incompatible with its "
                f"config ({type(err).__name__}: {err}). Re-download or re-save it."
            ) from err
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(
                f"The drafter checkpoint at {pretrained_model_name_or_path!r} does not match its config: {problems}. "
                "Re-save it with `save_pretrained`, or check that config.json belongs to these weights."
            )
        return model


def drafter_dtype_for(target) -> torch.dtype:
    """The dtype a drafter runs fastest in next to `target`: bf16 for an fp32 target on hardware with fast bf16 matmuls
    (CUDA GPUs that support it, CPUs with oneDNN bf16 kernels), else the target's own dtype.

    Lossless either way: the target verifies every token in its own dtype; the drafter's precision only moves how often
    its proposals are accepted.
    """
    if target.dtype != torch.float32:
        return target.dtype
    return torch.bfloat16 if has_fast_bf16(target.device) else target.dtype


def has_fast_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matrix products are fast on `device`: a CUDA GPU that supports bf16, or a CPU for which oneDNN has
    bf16 kernels (AVX-512 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return torch.backends.mkldnn.is_available() and is_supported is not None and bool(is_supported())
    return False


def check_draft_vocabulary(token_ids: torch.Tensor, config: DFlashDrafterConfig) -> None:
    """Raise unless `token_ids` are distinct target ids other than the mask token (which must never be proposed)."""
    vocab = config.target_vocab_size
    problem = None
    if token_ids.numel() == 0:
        problem = "it is empty"
    elif int(token_ids.min()) < 0 or (vocab is not None and int(token_ids.max()) >= vocab):
        problem = f"its ids must lie in [0, {vocab})"
    elif token_ids.unique().numel() != token_ids.numel():
        problem = "its ids repeat (a checkpoint saved without them loads zeros)"
    elif config.mask_token_id is not None and bool((token_ids == config.mask_token_id).any()):
        problem = f"it contains the mask token {config.mask_token_id}"
    if problem is not None:
        raise ValueError(
            f"Invalid draft vocabulary: {problem}. Make one with `blockpilot draft-vocab` or "
            "`training.data.frequent_token_ids`, or pass None for the whole vocabulary."
        )


def draft_head(target, drafter) -> nn.Module:
    """The target's LM head as the drafter proposes with it: what turns the drafter's block hidden states into
    proposals (`greedy_proposals`).

    The target's own module when the dtypes agree and the drafter proposes over the whole vocabulary; else a frozen copy
    in the drafter's dtype (a bf16 drafter next to an fp32 target) of the rows of its draft vocabulary, whose
    `draft_token_ids` map its outputs back to target ids. Proposals are only an argmax, so they need no more precision
    than the drafter has, and the head is most of a draft step's cost: on CPUs an fp32 GEMM with a few rows re-reads the
    whole (vocab x hidden) weight once per row (measurements: docs/performance.md). Neither its precision nor its rows
    change the output, only which proposals are made.
    """
    head = target.get_output_embeddings()
    token_ids = getattr(drafter, "draft_token_ids", None)
    if head.weight.dtype == drafter.dtype and token_ids is None:
        return head
    weight, bias = head.weight.detach(), getattr(head, "bias", None)
    if token_ids is not None:
        check_draft_vocabulary(token_ids, drafter.config)
        token_ids = token_ids.to(weight.device)
        weight, bias = weight[token_ids], None if bias is None else bias[token_ids]
    copy = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    copy.weight = nn.Parameter(weight.to(drafter.dtype), requires_grad=False)
    if bias is not None:
        copy.bias = nn.Parameter(bias.detach().to(drafter.dtype), requires_grad=False)
    if token_ids is not None:
        copy.register_buffer("draft_token_ids", token_ids.clone())
    return copy


def greedy_proposals(head: nn.Module, hidden_states: torch.Tensor) -> torch.LongTensor:
    """`argmax(head(hidden_states))` over the vocabulary, shaped like `hidden_states` without its last dimension.

    The product runs on a 2D view: on CPU a bf16 `linear` with a frozen weight over a strided 3D input (the block
    without its anchor) can take a slow path many times slower (docs/performance.md).
    """
    flat = hidden_states.reshape(-1, hidden_states.shape[-1]).to(head.weight.dtype)
    picks = head(flat).argmax(dim=-1)
    token_ids = getattr(head, "draft_token_ids", None)  # a head over a draft vocabulary (`draft_head`)
    if token_ids is not None:
        picks = token_ids[picks]
    return picks.view(hidden_states.shape[:-1])


def choose_mask_token_id(tokenizer) -> int:
    """A mask token for a new drafter: the tokenizer's own mask token if it has one, else the highest-id special token
    that is not BOS/EOS/PAD/UNK and does not occur in the chat template (e.g. `<empty_output>` for SmolLM2)."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return tokenizer.mask_token_id
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = getattr(tokenizer, "chat_template", None) or ""
    candidates = [
        (token_id, token.content if hasattr(token, "content") else str(token))
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    ]
    for token_id, text in sorted(candidates, reverse=True):
        if token_id not in reserved and text not in template:
            return token_id
    raise ValueError(
        "The tokenizer has no spare special token to use as the drafter's mask: add one with "
        "`tokenizer.add_special_tokens({'mask_token': '<|mask|>'})` and `target.resize_token_embeddings(len(tokenizer))`, "
        "or pass `mask_token_id` explicitly."
    )


AutoConfig.register(DFlashDrafterConfig.model_type, DFlashDrafterConfig)
AutoModel.register(DFlashDrafterConfig, DFlashDrafter)
