"""The decoding loop's machinery (`decoding/`): the draft KV cache it keeps incrementally, the workspaces it keeps on
the target between requests, the linear form its steps and prefill run in (`cpu_linear.decoding_linear_form`), and
the static cache read through a prefix of its slots.

(`test_lossless_*`, `test_batching` and `test_acceptance` check what the loop returns; this file checks how.)
"""

import contextlib

import pytest
import torch

import blockpilot_hf.decoding as decoding
from blockpilot_hf.cpu_linear import PackedLinear, active_linear_form, decoding_linear_form
from blockpilot_hf.decoding import DecodingWorkspace, DraftStep
from blockpilot_hf.features import context_features
from helpers.decoding import (
    FixedSizes,
    built_steps,
    forget_workspaces,
    needs_onednn,
    tight_caches,
    use_linear_form,
    workspaces,
)
from helpers.models import make_drafter, make_prompt, make_target, ragged_batch
from helpers.oracle import make_oracle

N_NEW = 24


# ----------------------------------------------------------------------------------------------- draft KV cache


def draft_from_scratch(target, drafter, tokens: torch.LongTensor, block_size: int) -> torch.LongTensor:
    """The drafter's proposals for a block anchored at the last of `tokens` (shape `(1, n)`), computed from nothing:
    one target forward over `tokens[:, :-1]`, one drafter forward on fresh caches. What the incremental loop must
    reproduce."""
    n = tokens.shape[1]
    with torch.no_grad():
        features = context_features(
            target(tokens[:, :-1], output_hidden_states=True).hidden_states, drafter.config.target_layer_ids
        )
        workspace = DecodingWorkspace(target, drafter, batch_size=1, capacity=n + 2 * block_size, use_graphs=False)
        workspace.reset(torch.ones(1, n - 1, dtype=torch.bool))
        workspace.row_block_sizes.fill_(block_size)
        _, draft = workspace.steps(block_size)
        draft.anchor_ids.fill_(int(tokens[0, -1]))
        draft.anchor_positions.fill_(n - 1)
        return draft.run(features, torch.arange(n - 1)[None], torch.tensor(0))


def record_draft_calls(monkeypatch, target) -> list:
    """Every `DraftStep.run` inside the real loop: (anchor ids, anchor positions, proposals, row block sizes), and a
    `("shrink", rows)` entry whenever the batch moves to a smaller workspace (`DecodingWorkspace.take_rows`)."""
    # Steps bind `run` when they are built: drop workspaces kept from earlier calls so every step is built patched.
    forget_workspaces(target)
    calls = []
    original_run, original_take_rows = DraftStep.run, DecodingWorkspace.take_rows

    def recorded(self, *args, **kwargs):
        proposals = original_run(self, *args, **kwargs)
        calls.append((self.anchor_ids[:, 0].tolist(), self.anchor_positions[:, 0].tolist(), proposals.tolist(),
                      self.row_block_sizes.tolist(), getattr(self.drafter, "real_hidden", None)))
        return proposals

    def take_rows(self, source, rows):
        calls.append(("shrink", rows.tolist()))
        return original_take_rows(self, source, rows)

    monkeypatch.setattr(DraftStep, "run", recorded)
    monkeypatch.setattr(DecodingWorkspace, "take_rows", take_rows)
    return calls


def check_drafts_against_scratch(calls, target, drafter, sequences, prompt_mask):
    """Every proposal the loop made for a live sequence equals drafting that sequence's committed prefix from scratch.
    For an oracle drafter (whose proposals depend on the row, not on the computation) the real drafter's hidden states
    are compared instead. Returns how many (call, row) pairs were checked."""
    checked = 0
    request_rows = list(range(len(sequences)))  # the request row of each row of the current batch
    for call in calls:
        if call[0] == "shrink":
            request_rows = [request_rows[i] for i in call[1]]
            continue
        anchors, positions, proposals, sizes, real_hidden = call
        assert len(anchors) == len(request_rows)
        for i, (anchor, position) in enumerate(zip(anchors, positions)):
            row = request_rows[i]
            real = sequences[row][prompt_mask[row].bool().tolist() + [True] * (len(sequences[row]) - prompt_mask.shape[1])]
            assert real[position] == anchor, (row, position)
            expected = draft_from_scratch(target, drafter, real[None, : position + 1], sizes[i])
            if real_hidden is None:
                assert proposals[i][: sizes[i] - 1] == expected[0].tolist(), (row, position)
            else:
                torch.testing.assert_close(
                    real_hidden[i, : sizes[i]], drafter.real_hidden[0], rtol=1e-4, atol=1e-5, msg=str((row, position))
                )
            checked += 1
    return checked


@pytest.mark.parametrize("block_size", (2, 5))
def test_incremental_drafts_equal_drafting_from_scratch(monkeypatch, qwen3_target, qwen3_drafter, block_size):
    """The static draft cache (context written at the target's slots, holes masked) gives, at every step of the real
    loop, exactly the proposals of a fresh forward over the committed prefix."""
    ids = make_prompt(4, length=6)
    calls = record_draft_calls(monkeypatch, qwen3_target)
    out = qwen3_target.generate(
        ids, assistant_model=qwen3_drafter, block_policy=block_size, do_sample=False, max_new_tokens=N_NEW
    )
    monkeypatch.undo()
    checked = check_drafts_against_scratch(calls, qwen3_target, qwen3_drafter, out, torch.ones_like(ids))
    assert checked == len(calls) > 3


def test_incremental_drafts_equal_drafting_from_scratch_in_a_ragged_batch(monkeypatch, qwen3_target):
    """Same in a left-padded batch whose rows accept different lengths (holes in the shared slots) and use different
    block sizes, including after the caches are compacted."""
    ids = make_prompt(5, length=8, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    drafter = make_oracle(qwen3_target, ids, N_NEW, block_size=5, corrupt_fraction=0.5, attention_mask=mask)
    sizes = FixedSizes([5, 2, 4])
    compactions = tight_caches(monkeypatch)
    calls = record_draft_calls(monkeypatch, qwen3_target)
    monkeypatch.setattr(qwen3_target.generation_config, "eos_token_id", None)
    out = qwen3_target.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=sizes, do_sample=False, max_new_tokens=N_NEW
    )
    monkeypatch.undo()
    assert compactions, "the test must exercise compaction"
    shrinks = [call for call in calls if call[0] == "shrink"]
    assert shrinks, "the test must exercise a batch moving to a smaller workspace as rows finish"
    checked = check_drafts_against_scratch(calls, qwen3_target, drafter, out, mask)
    assert checked == sum(len(call[0]) for call in calls if call[0] != "shrink") > 30


@pytest.mark.parametrize("drafter_layers", (None, ["sliding_attention", "full_attention"]))
def test_incremental_drafts_equal_drafting_from_scratch_with_a_copy_chain(monkeypatch, qwen3_target, drafter_layers):
    """With the copy chain the verified block is a tree whose two chains share positions: after a step the copy chain
    won, the drafter's context must hold the copied tokens' features, never the drafter chain's (full layers through
    the slot mask, sliding layers through their ring)."""
    import blockpilot_hf.decoding.loop as loop

    base = make_prompt(6, length=7)
    ids = torch.cat([base, base, base[:, :3]], dim=1)
    options = {} if drafter_layers is None else dict(layer_types=drafter_layers, sliding_window=3)
    drafter = make_drafter(qwen3_target, num_layers=2, block_size=5, seed=2, **options)
    copy_wins, original_walk = [], loop.walk

    def walk(branches, pick_at, first_slots):
        tokens, slots = original_walk(branches, pick_at, first_slots)
        copy_wins.append(slots[-1] >= first_slots[1])
        return tokens, slots

    calls = record_draft_calls(monkeypatch, qwen3_target)
    monkeypatch.setattr(loop, "walk", walk)
    out = qwen3_target.generate(
        ids, assistant_model=drafter, block_policy=4, prompt_lookup_num_tokens=4, do_sample=False, max_new_tokens=N_NEW
    )
    monkeypatch.undo()
    assert sum(copy_wins) >= 3, "the copy chain never won a step: the drafter's context never held copied tokens"
    checked = check_drafts_against_scratch(calls, qwen3_target, drafter, out, torch.ones_like(ids))
    assert checked == len(calls) > 3


# ----------------------------------------------------------------------------------------------- linear forms


def test_steps_and_prefill_run_in_the_form_the_rule_picks():
    """No timing: every step of every workspace, and the prompt's prefill, run their products in
    `cpu_linear.decoding_linear_form` (packed on CPU where oneDNN packs, else the usual `linear`)."""
    target = make_target("llama", seed=4)
    ids, mask = ragged_batch(seed=22, batch=2)
    drafter = make_oracle(target, ids, 300, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    prefill_forms = []
    hook = target.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_forms.append(active_linear_form())
        if kwargs["input_ids"].shape[1] == ids.shape[1] else None,
        with_kwargs=True,
    )
    kwargs = dict(attention_mask=mask, do_sample=False)
    lengths = (N_NEW, 300)  # 300 new tokens do not fit the first request's capacity
    outputs = [target.generate(ids, assistant_model=drafter, max_new_tokens=n, **kwargs) for n in lengths]
    hook.remove()
    for out, n in zip(outputs, lengths):
        assert torch.equal(out, target.generate(ids, max_new_tokens=n, **kwargs))
    assert len({w.capacity for w in workspaces(target) if w.batch_size == 2}) == 2
    expected = decoding_linear_form(torch.device("cpu"))
    steps = built_steps(target)
    assert steps and all(step.linear_form is expected for step in steps)
    assert prefill_forms == [None if expected is contextlib.nullcontext else expected] * 2


@needs_onednn
def test_prefill_runs_in_the_steps_form_from_the_first_request(monkeypatch):
    use_linear_form(monkeypatch, PackedLinear)
    target = make_target("llama", seed=6, hidden_size=64)
    ids, mask = ragged_batch(seed=23)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    prefill_forms = []
    target.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_forms.append(active_linear_form())
        if kwargs["input_ids"].shape[1] == ids.shape[1] else None,
        with_kwargs=True,
    )
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    outputs = [target.generate(ids, assistant_model=drafter, block_policy=4, **kwargs) for _ in range(2)]
    assert prefill_forms == [PackedLinear, PackedLinear]
    expected = target.generate(ids, assistant_model=None, **kwargs)
    assert all(torch.equal(out, expected) for out in outputs)


# ----------------------------------------------------------------------------------------------- static cache


def test_static_cache_prefix_reads_a_prefix_and_restores_the_buffers():
    """The eager path's attention reads only the slots in use; the cache's full buffers come back afterwards, holding
    what was written inside."""
    from blockpilot_hf.compat import cache_kwargs, new_static_cache, readable_length, set_cache_length, static_cache_prefix

    target = make_target("llama", seed=0)
    cache = new_static_cache(target.config, 64)
    assert readable_length(cache, 20) == 64  # not allocated yet: the first forward needs the full buffers
    ids = make_prompt(3, length=10)
    target(ids, use_cache=True, **cache_kwargs(target, cache))
    assert readable_length(cache, 20) == 20 and readable_length(cache, None) == 64
    full = [(layer.keys, layer.values) for layer in cache.layers]
    with static_cache_prefix(cache, 12):
        assert all(layer.keys.shape[2] == 12 for layer in cache.layers)
        set_cache_length(cache, torch.tensor(10))
        visible = torch.arange(12)[None, :] <= torch.tensor([10, 11])[:, None]  # causal over the 12 slots read
        target(make_prompt(4, length=2), position_ids=torch.tensor([[10, 11]]), use_cache=True,
               attention_mask=decoding.additive_mask(visible[None, None], target.dtype),
               **cache_kwargs(target, cache))
    for layer, (keys, values) in zip(cache.layers, full):
        assert layer.keys is keys and layer.values is values and keys.shape[2] == 64
        assert keys[:, :, 10:12].abs().sum() > 0 and keys[:, :, 12:].abs().sum() == 0
