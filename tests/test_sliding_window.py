"""Targets with sliding-window attention layers: uniform (Mistral) and mixed with full layers (Qwen2 with
`use_sliding_window`, Gemma 2, Gemma 3, gpt-oss), with windows of a few tokens and generations several windows long.

Sliding layers keep one cache slot per token like full ones (so rejected drafts roll back, holes compact and batches
shrink as everywhere else); the window is applied by the attention mask (`decoding.steps.attention_masks`).
"""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import blockpilot_hf
from blockpilot_hf.compat import attention_layer_types, new_static_cache, sliding_window
from blockpilot_hf.decoding import steps
from helpers.models import make_drafter, make_prompt, make_target
from helpers.oracle import make_oracle
from helpers.sampling import ALPHA, VOCAB_8, count, exact_distribution, goodness_of_fit

WINDOW = 4
N_NEW = 28  # seven windows


def sliding_target(kind: str, vocab_size: int = 96, window: int = WINDOW, seed: int = 0, logit_scale=None):
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
    # eager attention: Gemma 2's soft-capping and gpt-oss's sinks live there
    target = AutoModelForCausalLM.from_config(configs[kind](), attn_implementation="eager").eval()
    if logit_scale is not None:
        with torch.no_grad():
            target.get_output_embeddings().weight.mul_(logit_scale)
    return blockpilot_hf.enable(target)


KINDS = ["mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_targets_mix_the_layer_types_they_should(kind):
    target = sliding_target(kind)
    types = attention_layer_types(target.config)
    assert "sliding_attention" in types and sliding_window(target.config) == WINDOW
    assert ("full_attention" in types) == (kind != "mistral")


def _ragged(vocab_size: int, seed: int):
    ids = torch.cat([make_prompt(seed, length=11, vocab_size=vocab_size), make_prompt(seed + 1, 11, vocab_size)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16])
def test_greedy_equals_plain_generate_past_the_window(kind, block_size):
    target = sliding_target(kind)
    ids, mask = _ragged(96, seed=3)
    drafter = make_oracle(target, ids, N_NEW, block_size=max(block_size, 2), corrupt_fraction=0.3, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    plain = target.generate(ids, **kwargs)
    out = target.generate(
        ids, assistant_model=drafter, block_policy=block_size, return_dict_in_generate=True, **kwargs
    )
    assert torch.equal(out.sequences, plain)
    if block_size > 1:
        assert max(max(s) for s in out.acceptance_lengths) > 1  # blocks were accepted, not only corrections


def test_ignoring_the_window_is_caught(monkeypatch):
    """The same comparison fails when the mask treats sliding layers as full: the tests above can fail."""
    target = sliding_target("gemma2")
    ids, mask = _ragged(96, seed=3)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.3, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    plain = target.generate(ids, **kwargs)
    monkeypatch.setattr(steps, "sliding_window", lambda config: 10_000)
    assert not torch.equal(target.generate(ids, assistant_model=drafter, block_policy=4, **kwargs), plain)


def test_tight_caches_compact_and_batches_shrink_with_sliding_layers(monkeypatch):
    """Rejected drafts leave holes; with caches too small to hold them all, compaction moves every row's slots, and a
    slot's position (what the window is measured in) must survive it."""
    from helpers.decoding import tight_caches

    compactions = tight_caches(monkeypatch, spare_slots=6)
    target = sliding_target("qwen2", window=3)
    ids = torch.cat([make_prompt(s, length=9) for s in range(4)])
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[3, :6] = 0
    target.generation_config.eos_token_id = None
    drafter = make_oracle(target, ids, 40, block_size=4, corrupt_fraction=0.5, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    for new in (40, 13):
        out = target.generate(ids, assistant_model=drafter, block_policy=4, max_new_tokens=new, **kwargs)
        assert torch.equal(out, target.generate(ids, max_new_tokens=new, **kwargs))
    assert compactions


@pytest.mark.parametrize("window_in_mask", [True, False])
def test_sampling_follows_the_target_with_a_sliding_window(monkeypatch, window_in_mask):
    """Rows of one batch sample independently; with the prompt longer than the window, the continuations follow the
    target's own distribution, and a mask without the window (the broken variant) is caught."""
    if not window_in_mask:
        monkeypatch.setattr(steps, "sliding_window", lambda config: 10_000)
    target = sliding_target("mistral", vocab_size=VOCAB_8, window=2, logit_scale=10.0)
    ids = make_prompt(0, length=5, vocab_size=VOCAB_8)
    exact = exact_distribution(target, ids, 3, temperature=0.9)
    n = 3000
    drafter = make_oracle(target, ids, 3, corrupt_fraction=0.3)
    drafter._references = drafter._references * n  # every row has the same prompt, hence the same reference
    torch.manual_seed(7)
    out = target.generate(
        ids.expand(n, -1), assistant_model=drafter, block_policy=4, do_sample=True, temperature=0.9, max_new_tokens=3
    )
    counts = count(out[:, ids.shape[1] :].tolist())
    if window_in_mask:
        assert goodness_of_fit(counts, exact, n) > ALPHA
    else:
        outside = sum(c for k, c in counts.items() if k not in exact)
        assert outside > 0 or goodness_of_fit(counts, exact, n) < ALPHA


def test_layers_that_cannot_roll_back_are_refused_by_name():
    config = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"qwen2 model has \['linear_attention'\] layers"):
        new_static_cache(config, 32)


# ----------------------------------------------------------------------------------------------- sliding draft layers


def _sliding_drafter(target, window=3, seed=0):
    return make_drafter(
        target,
        num_layers=2,
        block_size=4,
        seed=seed,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=window,
    )


def _draft_reference(target, drafter, tokens: list[int], window: int | None) -> torch.Tensor:
    """Proposals for the block anchored at the last of `tokens`, from one drafter forward without cache or padding:
    the sliding layer's block queries see context positions `> query - window` (all with `window` None)."""
    from blockpilot_hf.features import context_features
    from blockpilot_hf.modeling_drafter import draft_head, greedy_proposals

    n, block = len(tokens), drafter.config.block_size
    ids = torch.tensor([tokens])
    with torch.no_grad():
        features = context_features(
            target(ids[:, :-1], output_hidden_states=True).hidden_states, drafter.config.target_layer_ids
        )
        block_ids = torch.tensor([[tokens[-1]] + [drafter.config.mask_token_id] * (block - 1)])
        query = torch.arange(n - 1, n - 1 + block)
        keys = torch.arange(n - 1)
        recent = keys[None, :] > query[:, None] - (window if window is not None else 10_000)
        sliding = torch.cat([recent, torch.ones(block, block, dtype=torch.bool)], dim=1)[None, None]
        full = torch.ones_like(sliding)
        hidden = drafter(
            noise_embeds=target.get_input_embeddings()(block_ids),
            context_hidden_states=features,
            position_ids=torch.cat([keys, query])[None],
            attention_mask={"sliding_attention": sliding, "full_attention": full},
        ).last_hidden_state
        return greedy_proposals(draft_head(target, drafter), hidden[:, 1:])[0]


def test_sliding_draft_layers_see_only_their_window():
    """The decoding loop's draft step, on a left-padded prompt (slots are not positions), proposes what one plain
    drafter forward with a windowed mask does; without the window the proposals change (the check can fail)."""
    from blockpilot_hf.decoding import DecodingWorkspace

    target = make_target("qwen3", seed=0)
    drafter = _sliding_drafter(target)
    differs = 0
    for seed in range(4):
        tokens = make_prompt(seed, length=10)[0].tolist()
        pad = 3
        ids = torch.tensor([[0] * pad + tokens])
        mask = torch.tensor([[False] * pad + [True] * len(tokens)])
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            features = context_features_of(target, drafter, ids[:, :-1], mask[:, :-1], positions[:, :-1])
            workspace = DecodingWorkspace(target, drafter, batch_size=1, capacity=64, use_graphs=False)
            workspace.reset(mask[:, :-1])
            workspace.row_block_sizes.fill_(4)
            _, draft = workspace.steps(4)
            draft.anchor_ids.fill_(tokens[-1])
            draft.anchor_positions.fill_(len(tokens) - 1)
            draft.place(0, ids.shape[1] - 1)
            proposals = draft.run(features, positions[:, :-1], torch.tensor(0))[0]
        assert proposals.tolist() == _draft_reference(target, drafter, tokens, window=3).tolist()
        differs += proposals.tolist() != _draft_reference(target, drafter, tokens, window=None).tolist()
    assert differs


def context_features_of(target, drafter, ids, mask, positions):
    from blockpilot_hf.features import context_features

    out = target(ids, attention_mask=mask.long(), position_ids=positions, output_hidden_states=True)
    return context_features(out.hidden_states, drafter.config.target_layer_ids)


def test_zlab_sliding_window_drafter_converts_and_decodes(tmp_path):
    """A z-lab-format draft with `layer_types` and `sliding_window` loads without remote code, keeps both, round-trips
    through our z-lab writer, and decodes losslessly next to a sliding-window target."""
    from blockpilot_hf import DFlashDrafter
    from blockpilot_hf.modeling_drafter import save_zlab_format

    target = sliding_target("gemma2")
    drafter = _sliding_drafter(target, window=5)
    save_zlab_format(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["layer_types"] == ["sliding_attention", "full_attention"] and raw["sliding_window"] == 5
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types == ["sliding_attention", "full_attention"] and loaded.config.sliding_window == 5
    ids, mask = _ragged(96, seed=5)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    plain = target.generate(ids, **kwargs)
    for block_size in (2, 4):
        assert torch.equal(target.generate(ids, assistant_model=loaded, block_policy=block_size, **kwargs), plain)


def test_a_sliding_drafter_config_needs_its_window():
    from blockpilot_hf import DFlashDrafterConfig

    with pytest.raises(ValueError, match="positive `sliding_window`"):
        DFlashDrafterConfig(num_target_layers=4, target_layer_ids=[1], layer_types=["sliding_attention"] * 2)
    # (newer transformers check the length themselves, with their own error)
    with pytest.raises(Exception, match="layer_types"):
        DFlashDrafterConfig(num_target_layers=4, target_layer_ids=[1], layer_types=["full_attention"])
