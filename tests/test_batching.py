"""Batches: every row of a speculative batch is exactly what plain batched `generate` returns for it.

Rows progress at their own speed (each accepts its own number of proposals per step), so the shared static caches get
holes that masks hide and compaction removes; prompts of different lengths are left-padded; each row can use its own
block size. Greedy output must equal plain batched greedy `generate` (left padding, pads after EOS and all), and
sampled rows must follow the target's distribution.
"""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import blockpilot_hf.decoding as decoding
from helpers.decoding import CollectingStreamer, FixedSizes, tight_caches
from helpers.models import VOCAB, make_drafter, make_prompt, make_target, ragged_batch
from helpers.oracle import make_oracle
from helpers.sampling import ALPHA, VOCAB_8, count, exact_distribution, goodness_of_fit, peaked_target

N_NEW = 24


def build(kind, target, ids, mask, block_size=5):
    if kind == "random":
        return make_drafter(target, block_size=block_size, seed=1)
    return make_oracle(target, ids, N_NEW, block_size=block_size, corrupt_fraction=0.35, attention_mask=mask)


def assert_same(expected, actual):
    assert actual.shape == expected.shape, f"{actual.tolist()} != {expected.tolist()}"
    assert torch.equal(actual, expected), f"{actual.tolist()} != {expected.tolist()}"


@pytest.fixture(scope="module")
def targets():
    return {"llama": make_target("llama", seed=0), "qwen3": make_target("qwen3", seed=1, hidden_size=64, num_layers=3)}


@pytest.mark.parametrize("kind", ("random", "oracle_corrupt"))
@pytest.mark.parametrize("target_kind", ("llama", "qwen3"))
@pytest.mark.parametrize("block_size", (1, 3, 5))
def test_ragged_batch_greedy_equals_plain_batch(targets, target_kind, kind, block_size):
    target = targets[target_kind]
    ids, mask = ragged_batch(seed=3)
    drafter = build(kind, target, ids, mask)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    out = target.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=block_size, do_sample=False,
        max_new_tokens=N_NEW, return_dict_in_generate=True,
    )
    assert_same(expected, out.sequences)
    assert out.block_sizes == [block_size] * 4
    for row, steps in enumerate(out.acceptance_lengths):
        assert 1 + sum(steps) == N_NEW and all(1 <= s <= block_size for s in steps), (row, steps)
    if kind == "oracle_corrupt" and block_size > 1:
        # rows really progressed at different speeds
        assert len({len(steps) for steps in out.acceptance_lengths}) > 1


def test_rows_finish_at_their_own_eos(targets):
    """A token that ends some rows early: finished rows are padded exactly as plain generate pads them."""
    target = targets["llama"]
    ids, mask = ragged_batch(seed=5)
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    # the 6th new token of row 1 becomes EOS: row 1 stops there, others may stop at their own occurrences
    eos = int(free[1, ids.shape[1] + 5])
    expected = target.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0
    )
    assert (expected == 0).any()  # the test really has early-finishing rows
    for kind in ("random", "oracle_corrupt"):
        drafter = build(kind, target, ids, mask)
        out = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, block_policy=5, do_sample=False,
            max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
        )
        assert_same(expected, out)


class StopRowsAt(StoppingCriteria):
    """Stops a row once it holds a given number of tokens (per row, by its prompt): rows stop at their own times."""

    def __init__(self, lengths: dict[tuple, int]):
        self.lengths = lengths

    def __call__(self, input_ids, scores, **kwargs):
        stops = [len(row) >= self.lengths.get(tuple(row[:width]), 10**9) for row in input_ids.tolist()
                 for width in [len(next(iter(self.lengths)))]]
        return torch.tensor(stops, device=input_ids.device)


@pytest.mark.parametrize("eos", (None, VOCAB - 2))
def test_rows_a_criterion_stops_early(targets, eos):
    """With an EOS id plain `generate` pads a row its criteria stopped; without one it keeps generating every row
    until all have stopped (all rows then end at the last stop). The loop does the same either way."""
    target = targets["llama"]
    ids, mask = ragged_batch(seed=5)
    width = ids.shape[1]
    stop_at = {tuple(ids[0].tolist()): width + 5, tuple(ids[2].tolist()): width + 9, tuple(ids[3].tolist()): width + 14}
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    expected = target.generate(ids, stopping_criteria=StoppingCriteriaList([StopRowsAt(stop_at)]), **kwargs)
    if eos is None:
        assert expected.shape[1] == width + N_NEW and not (expected[0, width + 5 :] == 0).all()
    for kind in ("random", "oracle_corrupt"):
        drafter = build(kind, target, ids, mask)
        out = target.generate(
            ids, assistant_model=drafter, block_policy=5, return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([StopRowsAt(stop_at)]), **kwargs,
        )
        assert_same(expected, out.sequences)
        for row, steps in enumerate(out.acceptance_lengths):
            assert 1 + sum(steps) == int((out.sequences[row, width:] != 0).sum()) or eos is not None, (row, steps)


def test_per_row_block_sizes_from_a_policy(targets):
    target = targets["qwen3"]
    ids, mask = ragged_batch(seed=7)
    drafter = build("oracle_corrupt", target, ids, mask, block_size=6)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    sizes = [6, 1, 3, 5]
    out = target.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=FixedSizes(sizes), do_sample=False,
        max_new_tokens=N_NEW, return_dict_in_generate=True,
    )
    assert_same(expected, out.sequences)
    assert out.block_sizes == sizes
    for size, steps in zip(sizes, out.acceptance_lengths):
        assert max(steps) <= size
    assert max(out.acceptance_lengths[0]) > 3  # the big block really was used


def test_compaction_keeps_the_output(monkeypatch, targets):
    """With caches just large enough, holes force compactions; output is unchanged."""
    target = targets["llama"]
    ids, mask = ragged_batch(seed=9)
    drafter = build("oracle_corrupt", target, ids, mask)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    calls = tight_caches(monkeypatch)
    out = target.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=5, do_sample=False, max_new_tokens=N_NEW
    )
    assert len(calls) >= 2
    assert_same(expected, out)


def test_finished_rows_leave_the_batch(monkeypatch):
    """Once at most half the rows still run, those continue in a smaller batch (their own workspace, same slots), so
    finished rows stop costing compute. Output, per-row processor prefixes and scores are unchanged."""
    target = make_target("llama", seed=0)
    ids, mask = ragged_batch(seed=15, batch=8, length=16)  # row i has 16 - 2i prompt tokens
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, repetition_penalty=1.3)
    new_tokens = free[:, ids.shape[1] :].tolist()
    # the EOS that ends the most rows early (each at its first occurrence), so rows finish at different steps
    eos = max(range(VOCAB), key=lambda t: sum(t in row[: N_NEW - 4] for row in new_tokens))
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                  repetition_penalty=1.3, output_scores=True, return_dict_in_generate=True)
    expected = target.generate(ids, **kwargs)
    drafter = make_oracle(target, ids, N_NEW, block_size=5, corrupt_fraction=0.35, attention_mask=mask,
                          repetition_penalty=1.3)  # the continuation without EOS: the same up to each row's EOS
    shrinks = []
    original = decoding.DecodingWorkspace.take_rows
    monkeypatch.setattr(decoding.DecodingWorkspace, "take_rows",
                        lambda self, source, rows: shrinks.append((source.batch_size, len(rows))) or original(self, source, rows))
    out = target.generate(ids, assistant_model=drafter, block_policy=5, **kwargs)
    assert_same(expected.sequences, out.sequences)
    assert len(shrinks) >= 2, "the test must move the batch to smaller workspaces more than once"
    assert all(smaller <= larger // 2 for larger, smaller in shrinks)
    for row, steps in enumerate(out.acceptance_lengths):
        generated = sum(steps) + 1  # the first new token comes from prefill
        for t in range(generated):
            torch.testing.assert_close(out.scores[t][row], expected.scores[t][row], rtol=1e-4, atol=1e-4)


def test_batch_with_logits_processors(targets):
    """Repetition penalty and min_new_tokens depend on each row's own prefix and length."""
    target = make_target("llama", seed=0, eos_token_id=7)
    ids, mask = ragged_batch(seed=11)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, repetition_penalty=1.4, min_new_tokens=6,
                  pad_token_id=0)
    expected = target.generate(ids, **kwargs)
    drafter = make_oracle(target, ids, N_NEW, block_size=5, corrupt_fraction=0.35, attention_mask=mask,
                          repetition_penalty=1.4)
    assert_same(expected, target.generate(ids, assistant_model=drafter, block_policy=5, **kwargs))


def test_batch_scores_match_plain_scores(targets):
    target = targets["llama"]
    ids, mask = ragged_batch(seed=13)
    drafter = build("oracle_corrupt", target, ids, mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, output_scores=True, output_logits=True,
                  return_dict_in_generate=True)
    expected = target.generate(ids, **kwargs)
    out = target.generate(ids, assistant_model=drafter, block_policy=5, **kwargs)
    assert len(out.scores) == len(expected.scores) == N_NEW
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


def test_streamer_needs_batch_size_one(targets):
    target = targets["llama"]
    ids, mask = ragged_batch(seed=1, batch=2)
    with pytest.raises(ValueError, match="Streamers take one sequence"):
        target.generate(ids, attention_mask=mask, assistant_model=make_drafter(target), streamer=CollectingStreamer(),
                        max_new_tokens=3)


def assert_rows_follow_the_target(target, prompts, samples: dict, new_tokens: int, sampling: dict, what: str):
    """Chi-square goodness of fit of the continuations sampled for each prompt (`samples[i]` for `prompts[i]`) against
    the target's exact processed distribution for it."""
    for which, prompt in enumerate(prompts):
        exact = exact_distribution(target, prompt, new_tokens, **sampling)
        p = goodness_of_fit(count(samples[which]), exact, len(samples[which]))
        assert p > ALPHA, f"prompt {which}: {what} are not distributed like the target (p={p:.2g})"


def padded_pair(seed: int, length_b: int, length_a: int = 4):
    """Two vocab-8 prompts (seeds `seed`, `seed + 1`) in one left-padded batch: row 0 is prompt a, row 1 is prompt b
    after `length_a - length_b` pads (a's first tokens). Returns `(prompt_a, prompt_b), ids, mask`."""
    prompt_a = make_prompt(seed, length=length_a, vocab_size=VOCAB_8)
    prompt_b = make_prompt(seed + 1, length=length_b, vocab_size=VOCAB_8)
    pads = length_a - length_b
    ids = torch.cat([prompt_a, torch.cat([prompt_a[:, :pads], prompt_b], 1)])
    mask = torch.tensor([[1] * length_a, [0] * pads + [1] * length_b])
    return (prompt_a, prompt_b), ids, mask


def test_sampled_rows_follow_the_target_distribution():
    """Rows of one batch sample independently (and desynchronise); each row's continuation is distributed as the
    target's own sampling for its prompt, whatever its padding."""
    target = peaked_target()
    prompts, ids, mask = padded_pair(0, length_b=3)  # row 1: one pad, then prompt_b
    new_tokens, rows_per_prompt, batch = 4, 1500, 50
    sampling = dict(temperature=0.7, top_p=0.9)
    drafter = make_oracle(target, ids, new_tokens, corrupt_fraction=0.3, attention_mask=mask)
    drafter._references = drafter._references * (batch // 2)
    torch.manual_seed(4321)
    samples = {0: [], 1: []}
    for _ in range(2 * rows_per_prompt // batch):
        out = target.generate(
            ids.repeat(batch // 2, 1), attention_mask=mask.repeat(batch // 2, 1), assistant_model=drafter,
            block_policy=4, do_sample=True, max_new_tokens=new_tokens, **sampling,
        )
        for row in range(batch):
            samples[row % 2].append(out[row, ids.shape[1] :].tolist())
    assert_rows_follow_the_target(target, prompts, samples, new_tokens, sampling, "batched speculative samples")


def test_num_return_sequences_follow_the_target_distribution():
    """`num_return_sequences` repeats each (padded) prompt into consecutive rows of one batch; every row is distributed
    as the target's own sampling for its prompt."""
    target = peaked_target()
    prompts, ids, mask = padded_pair(2, length_b=2)  # row 1: two pads, then prompt_b
    new_tokens, per_prompt, copies = 4, 1500, 25
    sampling = dict(temperature=0.8, top_k=5)
    drafter = make_oracle(target, ids, new_tokens, corrupt_fraction=0.3, attention_mask=mask)
    drafter._references = [reference for reference in drafter._references for _ in range(copies)]
    torch.manual_seed(2468)
    samples = {0: [], 1: []}
    for _ in range(per_prompt // copies):
        out = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, block_policy=4, do_sample=True,
            num_return_sequences=copies, max_new_tokens=new_tokens, **sampling,
        )
        assert out.shape == (2 * copies, ids.shape[1] + new_tokens)
        for row in range(2 * copies):
            samples[row // copies].append(out[row, ids.shape[1] :].tolist())
    assert_rows_follow_the_target(target, prompts, samples, new_tokens, sampling, "num_return_sequences rows")
