"""Tiny random fp32 targets, drafters and prompts.

Everything is tiny (hidden 32-64, 2-4 layers, vocab <= 128) so the whole suite runs in a few minutes on CPU.
Randomness is always seeded inside the factories, never at import time.
"""

import copy

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import blockpilot_hf
from blockpilot_hf import DFlashDrafter

from helpers.smollm2 import SMOL_EOS, SMOL_VOCAB

VOCAB = 96


def make_target(
    kind: str = "llama",
    seed: int = 0,
    vocab_size: int = VOCAB,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    eos_token_id=None,
    logit_scale: float | None = None,
    enable: bool = True,
):
    """A tiny random fp32 target. The same `(kind, seed, sizes)` always gives the same weights, whatever `eos_token_id`.

    `logit_scale` multiplies the LM head so the next-token distribution is peaked (useful for sampling tests: a random
    tiny model is otherwise almost uniform).
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM
    elif kind == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // num_heads, **common)
        cls = Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    if enable:
        blockpilot_hf.enable(model)
    return model


def make_smol_target(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, enable: bool = True):
    """A tiny random Llama with the SmolLM2 vocabulary and special tokens (bos 1, eos = pad = 2)."""
    config = LlamaConfig(
        vocab_size=SMOL_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=SMOL_EOS, pad_token_id=SMOL_EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = SMOL_EOS
    model.generation_config.pad_token_id = SMOL_EOS
    model.generation_config.bos_token_id = 1
    if enable:
        blockpilot_hf.enable(model)
    return model


def make_prompt(seed: int = 0, length: int = 7, vocab_size: int = VOCAB, batch: int = 1) -> torch.LongTensor:
    """A random prompt that never contains the mask token (the last id)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab_size - 1, (batch, length), generator=gen)


def ragged_batch(seed: int, batch: int = 4, length: int = 9):
    """Left-padded prompts of different lengths (row i loses i*2 leading tokens to padding): `(input_ids, mask)`."""
    ids = make_prompt(seed, length=length, batch=batch)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 2 * row] = 0
    return ids, mask


def make_drafter(target, num_layers: int = 1, block_size: int = 4, seed: int = 0, cls=DFlashDrafter, **kwargs):
    """A randomly initialised drafter for `target`, mask token = last vocabulary id."""
    torch.manual_seed(10_000 + seed)
    vocab = target.get_input_embeddings().weight.shape[0]
    return cls.from_target(target, num_layers=num_layers, block_size=block_size, mask_token_id=vocab - 1, **kwargs).eval()


def greedy_reference(target, input_ids: torch.LongTensor, max_new_tokens: int, **generate_kwargs) -> torch.LongTensor:
    """Plain greedy `generate` ignoring EOS: the full sequence (prompt + continuation) an oracle copies."""
    saved = copy.deepcopy(target.generation_config)
    try:
        target.generation_config.eos_token_id = None
        out = target.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, **generate_kwargs)
    finally:
        target.generation_config = saved
    assert out.shape[1] == input_ids.shape[1] + max_new_tokens
    return out


SLIDING_KINDS = ["mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"]


def sliding_target(
    kind: str, vocab_size: int = VOCAB, window: int = 4, seed: int = 0, logit_scale=None, attention: str = "eager"
):
    """A tiny random fp32 target with sliding-window layers: uniform (`mistral`) or mixed with full ones (the rest).
    Eager attention by default: Gemma 2's soft-capping and gpt-oss's sinks live there."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        sliding_window=window,
    )
    configs = {
        "mistral": lambda: transformers.MistralConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, max_window_layers=2, **common),
        "gemma2": lambda: transformers.Gemma2Config(**common),
        "gemma3": lambda: transformers.Gemma3TextConfig(
            layer_types=["sliding_attention", "full_attention"] * 2, **common
        ),
        "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, **common),
    }
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(configs[kind](), attn_implementation=attention).eval()
    if logit_scale is not None:
        with torch.no_grad():
            target.get_output_embeddings().weight.mul_(logit_scale)
    return blockpilot_hf.enable(target)
