"""Targets with sliding-window attention layers: uniform (Mistral) and mixed with full layers (Qwen2 with
`use_sliding_window`, Gemma 2, Gemma 3, gpt-oss), with windows of a few tokens and generations several windows long.

Sliding layers keep one cache slot per token like full ones (so rejected drafts roll back, holes compact and batches
shrink as everywhere else); the window is applied by the attention mask (`decoding.steps.attention_masks`).
"""

import json

import pytest
import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList

from blockpilot_hf.compat import attention_layer_types, new_static_cache, sliding_window
from blockpilot_hf.decoding import steps
from helpers.models import SLIDING_KINDS as KINDS
from helpers.models import make_drafter, make_prompt, make_target, sliding_target
from helpers.oracle import make_oracle
from helpers.sampling import ALPHA, VOCAB_8, count, exact_distribution, goodness_of_fit

WINDOW = 4  # (sliding_target's default)
N_NEW = 28  # seven windows


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


def _draft_reference(target, drafter, tokens: list[int], window: int | None, hidden_states: bool = False):
    """Proposals for the block anchored at the last of `tokens`, from one drafter forward without cache or padding:
    the sliding layer's block queries see context positions `> query - window` (all with `window` None). With
    `hidden_states`, the drafter's output at the proposed positions instead."""
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
        if hidden_states:
            return hidden[0, 1:]
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


class _StopRowsEarly(StoppingCriteria):
    """Stops the rows whose prompts are among `prompts` once they hold `length` tokens: a batch that shrinks."""

    def __init__(self, prompts: list[list[int]], length: int):
        self.prompts, self.length = prompts, length

    def __call__(self, input_ids, scores, **kwargs):
        width = len(self.prompts[0])
        return torch.tensor([row[:width] in self.prompts and len(row) >= self.length for row in input_ids.tolist()])


@pytest.mark.parametrize(
    "layer_types", [["sliding_attention", "full_attention"], ["sliding_attention", "sliding_attention"]]
)
def test_sliding_draft_layers_keep_only_their_window(monkeypatch, layer_types):
    """Over whole requests (left-padded rows, generations several windows long, compacted caches, a row stopping early
    so that the batch shrinks), the drafter's output at every block it proposes is what one plain drafter forward over
    the committed tokens with the windowed mask gives, while its sliding layers hold `window + max_block_size + 1` entries a row."""
    from blockpilot_hf.decoding import loop
    from blockpilot_hf.decoding import workspace as workspace_module
    from helpers.decoding import tight_caches, workspaces

    window, block = 3, 4
    compactions = tight_caches(monkeypatch, spare_slots=3)
    # A small vocabulary, so that random proposals are sometimes accepted and rows leave holes of different sizes.
    vocab = 16
    target = make_target("qwen3", seed=3, vocab_size=vocab)
    # (With an EOS token plain `generate` pads a row its criteria stopped, as the loop does.)
    target.generation_config.eos_token_id = vocab - 2
    drafter = make_drafter(
        target, num_layers=2, block_size=block, seed=2, layer_types=layer_types, sliding_window=window
    )
    drafter.config.max_block_size = block  # the ring then holds 8 positions: it wraps several times a request
    ids = torch.cat([make_prompt(s, length=9, vocab_size=vocab - 1) for s in range(3)])
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :2] = 0
    proposed = []  # (request row, anchor position, the drafter's output at the proposed positions) every draft
    drafted = []
    greedy_proposals = workspace_module.greedy_proposals
    monkeypatch.setattr(
        workspace_module,
        "greedy_proposals",
        lambda head, hidden: drafted.append(hidden) or greedy_proposals(head, hidden),
    )

    def recording(method):
        def wrapper(self, *args):
            method(self, *args)
            for i, row in enumerate(self.rows):
                proposed.append((row, int(self.draft.anchor_positions[i]), drafted[-1][i]))

        return wrapper

    monkeypatch.setattr(loop.SpeculativeBatch, "start", recording(loop.SpeculativeBatch.start))
    monkeypatch.setattr(loop.SpeculativeBatch, "draft_next", recording(loop.SpeculativeBatch.draft_next))
    stop = StoppingCriteriaList([_StopRowsEarly(ids[:2].tolist(), ids.shape[1] + 9)])
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0, stopping_criteria=stop)
    # An earlier request in the same workspaces leaves its ring behind: nothing of it may be seen.
    target.generate(ids.flip(1), assistant_model=drafter, block_policy=block, **{**kwargs, "attention_mask": None})
    proposed.clear()
    out = target.generate(ids, assistant_model=drafter, block_policy=block, **kwargs)
    assert torch.equal(out, target.generate(ids, **kwargs))
    assert compactions and len({ws.batch_size for ws in workspaces(target)}) > 1  # compacted, and shrank

    sequences = [row[int((~m.bool()).sum()) :].tolist() for row, m in zip(out, mask)]
    checked = set()
    for row, anchor, hidden in proposed:
        # A row that stopped keeps its last anchor (its later blocks are never read): check each anchor once.
        if (row, anchor) in checked or anchor + 1 >= len(sequences[row]):
            continue
        checked.add((row, anchor))
        reference = _draft_reference(target, drafter, sequences[row][: anchor + 1], window, hidden_states=True)
        torch.testing.assert_close(hidden, reference, rtol=1e-4, atol=1e-5, msg=f"row {row}, anchor at {anchor}")
    assert len(checked) > 30 and max(anchor for _, anchor in checked) > 5 * window
    for workspace in workspaces(target):
        sliding = [
            layer for layer, kind in zip(workspace.drafter_cache.layers, layer_types) if kind != "full_attention"
        ]
        ring = window + drafter.config.max_block_size + 1  # however long the context
        assert sliding and all(layer.keys.shape[2] == ring for layer in sliding)


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


# ----------------------------------------------------------------------------------------------- training a sliding drafter


def test_the_windowed_training_layout_is_the_decoding_window():
    """Many blocks in one training forward (`build_block_layout` with a `sliding_window`) give, block by block, the
    drafter output that decoding's windowed forward gives for that anchor alone."""
    from blockpilot_hf.features import context_features
    from blockpilot_hf.layout import build_block_layout

    target = make_target("qwen3", seed=0)
    drafter = _sliding_drafter(target, window=3)
    tokens = make_prompt(7, length=16)[0].tolist()
    ids, anchors, block = torch.tensor([tokens]), torch.tensor([[4, 8, 9, 13]]), drafter.config.block_size
    positions = torch.arange(len(tokens))[None]
    with torch.no_grad():
        features = context_features(
            target(ids, output_hidden_states=True).hidden_states, drafter.config.target_layer_ids
        )
        layout = build_block_layout(
            torch.gather(ids, 1, anchors), anchors, block, drafter.config.mask_token_id, positions, sliding_window=3
        )
        hidden = drafter(
            noise_embeds=target.get_input_embeddings()(layout.input_ids),
            context_hidden_states=features,
            position_ids=torch.cat([positions, layout.position_ids], dim=1),
            attention_mask=layout.attention_mask,
        ).last_hidden_state.view(anchors.shape[1], block, -1)
    for a, anchor in enumerate(anchors[0].tolist()):
        reference = _draft_reference(target, drafter, tokens[: anchor + 1], window=3, hidden_states=True)
        torch.testing.assert_close(hidden[a, 1:], reference, rtol=1e-4, atol=1e-5)


def test_training_makes_a_sliding_drafter_that_decodes(tmp_path):
    from blockpilot_hf.training.drafter import train_drafter
    from helpers.training import greedy_rows, tiny_training_args

    target = make_target("qwen3", seed=0)
    args = tiny_training_args(tmp_path, num_layers=2, max_steps=20, sliding_window=3)
    drafter = train_drafter(target, greedy_rows(target, num_prompts=8), args)
    assert drafter.config.layer_types == ["sliding_attention"] * 2 and drafter.config.sliding_window == 3
    losses = [record["loss"] for record in json.loads((tmp_path / "training_log.json").read_text())["history"]]
    assert losses[-1] < losses[0]
    ids, mask = _ragged(96, seed=4)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    out = target.generate(ids, assistant_model=drafter, block_policy=4, **kwargs)
    assert torch.equal(out, target.generate(ids, **kwargs))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_types=["sliding_attention"]), "for each of the 2 draft layers"),
        (dict(layer_types=["sliding_attention", "global"]), "must name 'full_attention' or 'sliding_attention'"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "need a positive `sliding_window`"),
        (dict(sliding_window=0), "need a positive `sliding_window`"),
    ],
)
def test_bad_sliding_training_options_are_refused(tmp_path, overrides, message):
    from helpers.training import tiny_training_args

    with pytest.raises(ValueError, match=message):
        tiny_training_args(tmp_path, num_layers=2, **overrides)
