"""Acceptance bookkeeping: with a drafter that copies the target every proposal is accepted, with a corrupted copy the
accepted prefix stops exactly at the first corrupted position; plus unit tests of the pure step functions."""

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from blockpilot_hf.decoding import accepted_prefix_length, process_block_scores, select_tokens
from blockpilot_hf.decoding.steps import process_rows, processors_per_row, scores_only_tail
from blockpilot_hf.decoding.tree import VerifyTree
from helpers.models import greedy_reference, make_prompt, make_target
from helpers.oracle import make_oracle

N_NEW = 40


@pytest.fixture(scope="module")
def setup():
    target = make_target("llama", seed=0)
    ids = make_prompt(0, length=6)
    return target, ids


@pytest.mark.parametrize("block_size", (2, 3, 4, 7, 8, 16, 20))
@pytest.mark.parametrize("max_new_tokens", (N_NEW, 23))
def test_clean_oracle_accepts_every_proposal(setup, block_size, max_new_tokens):
    target, ids = setup
    drafter = make_oracle(target, ids, N_NEW)
    kwargs = dict(block_policy=block_size, do_sample=False, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    # On CPU a step's first call also times it in both product forms (`cpu_linear.py`): count the calls of a request
    # that finds its steps already measured.
    target.generate(ids, assistant_model=drafter, **kwargs)
    drafter.oracle_calls.clear()
    out = target.generate(ids, assistant_model=drafter, **kwargs)
    (lengths,) = out.acceptance_lengths
    generated = out.sequences.shape[1] - ids.shape[1]
    assert generated == max_new_tokens
    assert 1 + sum(lengths) == generated
    assert out.block_sizes == [block_size]
    assert all(a == block_size for a in lengths[:-1]), lengths
    assert 1 <= lengths[-1] <= block_size
    # the number of steps is the minimum possible
    assert len(lengths) == -(-(generated - 1) // block_size)
    # the drafter was called once per step, anchored at the last committed token (steps keep one shape, so the last
    # ones draft a whole block even when fewer tokens are left: only the acceptance is capped)
    anchors = [a for a, _ in drafter.oracle_calls]
    step_anchors = [ids.shape[1] + sum(lengths[:i]) for i in range(len(lengths))]
    assert anchors == step_anchors


@pytest.mark.parametrize("block_size", (2, 5, 9, 16))
@pytest.mark.parametrize("salt", (0, 1, 2))
def test_corrupted_oracle_accepts_up_to_first_corruption(setup, block_size, salt):
    """Each step commits 1 + (number of leading uncorrupted proposals), exactly."""
    target, ids = setup
    drafter = make_oracle(target, ids, N_NEW, corrupt_fraction=0.3, salt=salt)
    out = target.generate(
        ids, assistant_model=drafter, block_policy=block_size, do_sample=False, max_new_tokens=N_NEW,
        return_dict_in_generate=True,
    )
    (lengths,) = out.acceptance_lengths
    assert 1 + sum(lengths) == out.sequences.shape[1] - ids.shape[1] == N_NEW
    anchor, max_length = ids.shape[1], ids.shape[1] + N_NEW
    for step, committed in enumerate(lengths):
        b = min(block_size, max_length - anchor - 1)  # never drafts past max_length (anchor = last token)
        clean = 0
        while clean < b - 1 and not drafter._corrupted(anchor, clean + 1):
            clean += 1
        assert committed == clean + 1, (step, anchor, lengths)
        anchor += committed
    assert any(a < block_size for a in lengths[:-1]) or len(lengths) <= 1  # partial acceptance really happened


def test_block_size_one_never_drafts(setup):
    target, ids = setup
    drafter = make_oracle(target, ids, N_NEW)
    out = target.generate(
        ids, assistant_model=drafter, block_policy=1, do_sample=False, max_new_tokens=12, return_dict_in_generate=True
    )
    assert out.acceptance_lengths == [[1] * 11]
    assert out.block_sizes == [1]
    assert drafter.oracle_calls == []


def test_default_block_size_is_drafters(setup):
    target, ids = setup
    drafter = make_oracle(target, ids, N_NEW, block_size=6)
    out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=20, return_dict_in_generate=True)
    assert out.block_sizes == [6]
    assert out.acceptance_lengths[0][:-1] == [6] * (len(out.acceptance_lengths[0]) - 1)


def test_oracle_reference_is_plain_greedy(setup):
    """The oracle copies exactly what plain greedy would produce (the premise of the tests above)."""
    target, ids = setup
    expected = target.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(greedy_reference(target, ids, N_NEW), expected)


# ----------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "proposals, target_tokens, expected",
    [
        ([[1, 2, 3]], [[1, 2, 3]], [3]),
        ([[1, 2, 3]], [[1, 2, 4]], [2]),
        ([[1, 2, 3]], [[0, 2, 3]], [0]),  # a later match after a miss does not count
        ([[1, 2, 3]], [[1, 0, 3]], [1]),
        ([[5]], [[5]], [1]),
        ([[5]], [[4]], [0]),
        ([[1, 2], [1, 2], [3, 3]], [[1, 2], [1, 0], [0, 3]], [2, 1, 0]),
    ],
)
def test_accepted_prefix_length(proposals, target_tokens, expected):
    got = accepted_prefix_length(torch.tensor(proposals), torch.tensor(target_tokens))
    assert got.tolist() == expected


def test_accepted_prefix_length_empty():
    got = accepted_prefix_length(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
    assert got.tolist() == [0]


def test_select_tokens_greedy():
    scores = torch.tensor([[[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]], [[0.0, 0.0, 5.0], [-1.0, -2.0, -0.5]]])
    assert select_tokens(scores, do_sample=False).tolist() == [[1, 0], [2, 2]]
    assert select_tokens(scores[:, 0], do_sample=False).tolist() == [1, 2]


def test_select_tokens_sampling_shape_and_support():
    torch.manual_seed(0)
    scores = torch.full((1, 5, 7), float("-inf"))
    scores[0, torch.arange(5), torch.tensor([3, 1, 6, 0, 2])] = 0.0  # point masses
    assert select_tokens(scores, do_sample=True).tolist() == [[3, 1, 6, 0, 2]]
    scores = torch.full((1, 2, 4), float("-inf"))
    scores[..., 1] = 0.0
    scores[..., 2] = 0.0
    picks = torch.stack([select_tokens(scores, do_sample=True) for _ in range(200)])
    assert picks.shape == (200, 1, 2)
    assert set(picks.unique().tolist()) == {1, 2}


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0**-24])  # the ends of what torch.rand returns
def test_select_tokens_sampling_never_draws_a_masked_token(monkeypatch, uniform):
    scores = torch.full((2, 3, 8), float("-inf"))
    scores[..., 3] = 0.0  # one token left, e.g. by top-k 1
    scores[1, :, 5] = -30.0
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.full(shape, uniform, dtype=kwargs["dtype"]))
    assert select_tokens(scores, do_sample=True).tolist() == [[3, 3, 3], [3, 3, 3]]


def test_select_tokens_sampling_frequencies():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.7])
    scores = probs.log().expand(4000, 1, 3)
    freq = select_tokens(scores, do_sample=True).flatten().bincount(minlength=3).float() / 4000
    # 4000 draws: std of each frequency <= 0.008, so 0.04 is > 5 sigma
    assert torch.allclose(freq, probs, atol=0.04), freq


def test_process_block_scores_uses_each_positions_prefix():
    torch.manual_seed(0)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0)])
    candidate_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    logits = torch.randn(1, 3, 8).abs() + 0.5
    start = 4  # logits[:, k] predicts position 4 + k, prefix candidate_ids[:, :4 + k]
    got = process_block_scores(processors, candidate_ids, logits.clone(), start)
    for k in range(3):
        expected = processors(candidate_ids[:, : start + k], logits[:, k].clone())
        assert torch.equal(got[:, k], expected)
    assert got[0, 0, 5] == logits[0, 0, 5]  # token 5 not yet in the prefix of position 4
    assert got[0, 1, 5] == logits[0, 1, 5] / 2.0  # ... but is in the prefix of position 5


PROCESSOR_LISTS = {
    "penalty, then warpers": lambda: [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                      TopKLogitsWarper(5), TopPLogitsWarper(0.8)],
    "warpers only": lambda: [TemperatureLogitsWarper(0.5), TopKLogitsWarper(4), MinPLogitsWarper(0.05)],
    "a warper before the penalty": lambda: [TopKLogitsWarper(6), RepetitionPenaltyLogitsProcessor(2.0),
                                            TemperatureLogitsWarper(1.5)],
}


@pytest.mark.parametrize("copy_tokens", [0, 2])
@pytest.mark.parametrize("name", list(PROCESSOR_LISTS))
def test_process_rows_runs_the_scores_only_tail_once_with_the_same_result(name, copy_tokens):
    """Each row's every position (each tree node) processed with its own prefix, one position at a time, is what
    `process_rows` returns, also where the trailing warpers run once over the whole block."""
    torch.manual_seed(0)
    processors = LogitsProcessorList(PROCESSOR_LISTS[name]())
    assert scores_only_tail(processors) == {"penalty, then warpers": 3, "warpers only": 3}.get(name, 1)
    tree = VerifyTree(draft_tokens=3, copy_tokens=copy_tokens)
    sequences = [[5, 1, 2, 3], [7, 7, 4, 9, 1, 6]]
    block_ids = torch.randint(0, 12, (2, tree.length))
    logits = torch.randn(2, tree.length, 12)
    got = process_rows(processors_per_row(processors, 2), sequences, block_ids, logits.clone(), tree)
    for row, tokens in enumerate(sequences):
        for slot in range(tree.length):
            prefix = torch.tensor([tokens + block_ids[row, tree.path(slot)].tolist()])  # the node and its ancestors
            expected = processors(prefix, logits[row : row + 1, slot].clone())
            assert torch.equal(got[row, slot], expected[0]), (row, slot)
