"""The copy branch (`prompt_lookup_num_tokens` with a DFlash drafter): tokens copied from the context are verified
in the same forward as the drafter's block, as a second chain of a tree, and decoding stays lossless.

Greedy output equals plain `generate` over drafters, block sizes, copy lengths, batches with holes and compactions,
logits processors, stopping edges and sliding-window targets; sampling follows the target's processed distribution,
and the plausible shortcut of taking the longer chain also when sampling is caught by the same test.
"""

import pytest
import torch

import blockpilot_hf.decoding.loop as loop
from blockpilot_hf.decoding.context_copy import ContextCopyProposer
from blockpilot_hf.decoding.tree import VerifyTree, walk
from helpers.decoding import tight_caches
from helpers.models import make_drafter, make_prompt, make_target, ragged_batch, sliding_target
from helpers.oracle import make_bad_drafter, make_oracle
from helpers.sampling import ALPHA, count, exact_distribution, goodness_of_fit, peaked_target

N_NEW = 40


def repeating_prompt(seed: int, length: int = 9, batch: int = 1) -> torch.LongTensor:
    """A prompt that repeats itself, so that there is something to copy from the first step on."""
    ids = make_prompt(seed, length=length, batch=batch)
    return torch.cat([ids, ids, ids[:, :3]], dim=1)


def assert_same(expected, actual):
    assert actual.shape == expected.shape, f"{actual.tolist()} != {expected.tolist()}"
    assert torch.equal(actual, expected), f"{actual.tolist()} != {expected.tolist()}"


def mean_tau(out) -> float:
    steps = [a for row in out.acceptance_lengths for a in row]
    return sum(steps) / len(steps)


# ----------------------------------------------------------------------------------------------- the proposer


def test_proposer_copies_after_the_latest_earlier_occurrence_of_the_longest_suffix():
    tokens = [9, 9, 1, 2, 3, 7, 2, 3, 8, 1, 2, 3]  # the first two are left padding
    copier = ContextCopyProposer([tokens], starts=[2], num_tokens=3)
    assert copier.propose(0) == [7, 2, 3]  # "1 2 3" occurred before, followed by 7; "2 3 8" comes later but is shorter
    tokens += [5]
    copier.update(0)
    assert copier.propose(0) == []  # 5 never occurred before
    tokens += [2]
    copier.update(0)
    assert copier.propose(0) == [3, 5, 2]  # "5 2" is new, so the latest earlier "2" is taken, at the end: [3, 5, 2]


def test_proposer_copy_runs_on_through_itself_past_the_end_of_the_context():
    copier = ContextCopyProposer([[1, 2, 3, 1, 2]], starts=[0], num_tokens=7)
    assert copier.propose(0) == [3, 1, 2, 3, 1, 2, 3]  # "1 2" ended at 2: "3 1 2", then the copy's own "3 1 2 3"
    copier = ContextCopyProposer([[5, 4, 4]], starts=[0], num_tokens=4)
    assert copier.propose(0) == [4, 4, 4, 4]  # a loop of period 1


def test_proposer_never_matches_nor_copies_padding():
    copier = ContextCopyProposer([[4, 4, 4, 1, 4]], starts=[3], num_tokens=4)
    assert copier.propose(0) == []  # the padding's 4s are not an earlier occurrence


def test_proposer_index_is_bounded_and_equal_to_one_built_from_scratch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 6, (12,)).tolist()
    grown = ContextCopyProposer([tokens], starts=[0], num_tokens=5, max_ngram=3)
    for _ in range(40):
        tokens += torch.randint(0, 6, (int(torch.randint(1, 4, ())),)).tolist()
        grown.update(0)
        fresh = ContextCopyProposer([list(tokens)], starts=[0], num_tokens=5, max_ngram=3)
        assert grown.propose(0) == fresh.propose(0)
        assert grown.latest_end[0] == fresh.latest_end[0]
    assert len(grown.latest_end[0]) <= 3 * len(tokens)  # at most max_ngram entries per token


# ----------------------------------------------------------------------------------------------- the tree


def test_tree_nodes_see_exactly_their_ancestors():
    tree = VerifyTree(draft_tokens=3, copy_tokens=2)
    assert tree.depths == (0, 1, 2, 3, 1, 2)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 0],
            [1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.visibility(), expected)
    assert torch.equal(VerifyTree(4).visibility(), torch.ones(5, 5, dtype=torch.bool).tril())  # a chain is causal


def test_walk_follows_the_chain_that_matches_and_merges_equal_prefixes():
    picks = {0: 5, 1: 6, 2: 1, 4: 9, 5: 3}
    assert walk([[5, 6, 7], [5, 9]], picks.__getitem__, [1, 4]) == ([5, 6, 1], [0, 1, 2])
    picks[1] = 9  # the shared node's pick now continues the copy chain, whose next node is slot 5
    assert walk([[5, 6, 7], [5, 9]], picks.__getitem__, [1, 4]) == ([5, 9, 3], [0, 1, 5])
    assert walk([[], [2]], {0: 2, 4: 8}.__getitem__, [1, 4]) == ([2, 8], [0, 4])
    assert walk([[], []], {0: 2}.__getitem__, [1, 4]) == ([2], [0])


# ----------------------------------------------------------------------------------------------- greedy


@pytest.fixture(scope="module")
def llama():
    return make_target("llama", seed=0)


def drafter_of(kind, target, ids, **kwargs):
    if kind == "random":
        return make_drafter(target, seed=1)
    if kind == "oracle_corrupt":
        return make_oracle(target, ids, N_NEW, corrupt_fraction=0.35, **kwargs)
    return make_bad_drafter(target, fixed_token=3)


@pytest.mark.parametrize("copy_tokens", (1, 3, 8))
@pytest.mark.parametrize("block_size", (1, 2, 4, 9))
@pytest.mark.parametrize("kind", ("random", "oracle_corrupt", "bad"))
@pytest.mark.parametrize("seed", (0, 1))
def test_greedy_with_copy_branch_equals_plain(llama, seed, kind, block_size, copy_tokens):
    ids = repeating_prompt(seed)
    expected = llama.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    drafter = drafter_of(kind, llama, ids)
    out = llama.generate(
        ids, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=copy_tokens,
        do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True,
    )
    assert_same(expected, out.sequences)
    assert all(1 <= a <= max(block_size, copy_tokens + 1) for a in out.acceptance_lengths[0])


def test_copy_branch_is_used_where_the_answer_repeats(llama):
    """Seed 1's greedy answer falls into a loop: copying accepts far more than drafting with a random drafter."""
    ids = repeating_prompt(1)
    drafter = make_drafter(llama, seed=1)
    common = dict(assistant_model=drafter, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
    alone = mean_tau(llama.generate(ids, block_policy=4, **common))
    copy_only = mean_tau(llama.generate(ids, block_policy=1, prompt_lookup_num_tokens=8, **common))
    both = mean_tau(llama.generate(ids, block_policy=4, prompt_lookup_num_tokens=8, **common))
    assert alone < 1.5 and copy_only > 2.5 and both >= copy_only, (alone, copy_only, both)


@pytest.mark.parametrize("kind", ("random", "oracle_corrupt"))
def test_ragged_batch_with_copy_branch_and_compactions_equals_plain(llama, monkeypatch, kind):
    ids, mask = ragged_batch(3, batch=4, length=9)
    ids = torch.cat([ids, ids[:, -6:], ids[:, -6:]], dim=1)
    mask = torch.cat([mask, torch.ones_like(ids[:, -12:])], dim=1)
    expected = llama.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    drafter = drafter_of(kind, llama, ids, attention_mask=mask)
    compactions = tight_caches(monkeypatch, spare_slots=14)
    out = llama.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=3, prompt_lookup_num_tokens=6,
        do_sample=False, max_new_tokens=N_NEW,
    )
    assert_same(expected, out)
    assert compactions, "the caches were never compacted: the test does not exercise holes"


def test_logits_processors_see_each_nodes_own_prefix(llama):
    """Repetition penalty depends on the prefix: a copy node's prefix is its own chain, not the drafter's."""
    ids = repeating_prompt(1)
    kwargs = dict(do_sample=False, max_new_tokens=N_NEW, repetition_penalty=1.3, no_repeat_ngram_size=5)
    expected = llama.generate(ids, **kwargs)
    drafter = make_oracle(llama, ids, N_NEW, corrupt_fraction=0.35, repetition_penalty=1.3, no_repeat_ngram_size=5)
    for block_size in (2, 5):
        out = llama.generate(ids, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=4, **kwargs)
        assert_same(expected, out)


@pytest.mark.parametrize("max_new_tokens", (1, 2, 5))
def test_length_edges_with_copy_branch(llama, max_new_tokens):
    ids = repeating_prompt(1)
    expected = llama.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    out = llama.generate(
        ids, assistant_model=make_drafter(llama, seed=1), block_policy=3, prompt_lookup_num_tokens=8,
        do_sample=False, max_new_tokens=max_new_tokens,
    )
    assert_same(expected, out)


def test_eos_inside_a_copied_chain(llama):
    ids = repeating_prompt(1)
    reference = llama.generate(ids, do_sample=False, max_new_tokens=N_NEW)[0, ids.shape[1] :].tolist()
    eos = reference[12]
    expected = llama.generate(ids, do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos)
    assert expected.shape[1] < ids.shape[1] + N_NEW  # really stops early
    out = llama.generate(
        ids, assistant_model=make_drafter(llama, seed=1), block_policy=2, prompt_lookup_num_tokens=8,
        do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos,
    )
    assert_same(expected, out)


@pytest.mark.parametrize("kind", ("mistral", "gemma3"))
def test_sliding_window_target_with_copy_branch_equals_plain(kind):
    """Both chains hold the same positions, so the target's sliding layers must measure a block slot by its node's
    position, not by counting valid slots."""
    target = sliding_target(kind, window=4, seed=0)
    ids = repeating_prompt(2)
    expected = target.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    drafter = make_oracle(target, ids, N_NEW, corrupt_fraction=0.35)
    out = target.generate(
        ids, assistant_model=drafter, block_policy=4, prompt_lookup_num_tokens=6, do_sample=False,
        max_new_tokens=N_NEW,
    )
    assert_same(expected, out)


def test_sliding_window_drafter_with_copy_branch_equals_plain(llama):
    """A drafter whose sliding layers keep a ring by position (`window_cache`): the two chains' slots share positions,
    and only the kept one may land in the ring."""
    ids = repeating_prompt(1)
    expected = llama.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    drafter = make_drafter(
        llama, num_layers=2, block_size=8, seed=1, layer_types=["sliding_attention", "full_attention"], sliding_window=3
    )
    drafter.config.max_block_size = 8  # a small ring that wraps several times
    for block_size in (3, 6):
        out = llama.generate(
            ids, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=5, do_sample=False,
            max_new_tokens=N_NEW,
        )
        assert_same(expected, out)


# ----------------------------------------------------------------------------------------------- sampling


def longest_chain(branches, pick_at, first_slots):
    """A plausible shortcut: walk each chain with its own slots' picks and keep the longer (the drafter's on a tie).
    With greedy picks this commits what `walk` does; with samples it chooses among independent draws by their values,
    which is biased."""
    best = ([pick_at(0)], [0])
    for branch, first in zip(branches, first_slots):
        tokens, slots, slot = [], [0], 0
        for depth, proposal in enumerate(branch):
            pick = pick_at(slot)
            tokens.append(pick)
            if pick != proposal:
                break
            slot = first + depth
            slots.append(slot)
        else:
            tokens.append(pick_at(slot))
        if len(slots) > len(best[1]):
            best = (tokens, slots)
    return best


# A Markov chain over 4 tokens: a node's distribution depends on its own token, as a target's depends on the prefix.
MARKOV = torch.tensor(
    [[0.1, 0.7, 0.1, 0.1], [0.05, 0.05, 0.45, 0.45], [0.3, 0.3, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]],
    dtype=torch.float64,
)


def markov_walk_counts(walk_fn, trials: int, length: int = 4) -> dict:
    """Sequences of `length` tokens after anchor 0: one tree step with the drafter's chain [1, 2, 1] and the copy's
    [1, 3, 3] (they share their first token), every slot's pick one independent sample of its node's distribution,
    then plain sampling to `length` tokens."""
    generator = torch.Generator().manual_seed(11)
    draft, copy = [1, 2, 1], [1, 3, 3]
    node_tokens = [0] + draft + copy  # the token each slot holds: its pick is sampled given it
    rows = []
    for _ in range(trials):
        picks = [int(torch.multinomial(MARKOV[t], 1, generator=generator)) for t in node_tokens]
        tokens, _ = walk_fn([draft, copy], picks.__getitem__, [1, 1 + len(draft)])
        while len(tokens) < length:
            tokens.append(int(torch.multinomial(MARKOV[tokens[-1]], 1, generator=generator)))
        rows.append(tokens[:length])
    return count(rows)


def markov_distribution(length: int = 4) -> dict:
    probs = {(): 1.0}
    for _ in range(length):
        probs = {
            prefix + (t,): p * float(MARKOV[prefix[-1] if prefix else 0, t]) for prefix, p in probs.items() for t in range(4)
        }
    return probs


def test_tree_walk_samples_the_target_distribution_and_the_longer_chain_shortcut_does_not():
    exact, trials = markov_distribution(), 20000
    p_walk = goodness_of_fit(markov_walk_counts(walk, trials), exact, trials)
    assert p_walk > ALPHA, f"the tree walk is not distributed like the target (p={p_walk:.2g})"
    p_short = goodness_of_fit(markov_walk_counts(longest_chain, trials), exact, trials)
    assert p_short < ALPHA, f"the longer-chain shortcut went unnoticed (p={p_short:.2g}): the test is too weak"


@pytest.mark.long
def test_sampling_with_copy_branch_follows_the_target(monkeypatch):
    """End to end through the loop: 4,000 rows of one batch sample 4 tokens each; the drafter always proposes 2 and
    the prompt alternates 2 and 4, so both chains are accepted, alone and sharing their first token."""
    target = peaked_target()
    ids = torch.tensor([[2, 4, 2, 4, 2, 4, 2]])
    exact = exact_distribution(target, ids, 4, temperature=0.9)
    accepted_by = {"drafter": 0, "copy": 0}

    def counting_walk(branches, pick_at, first_slots):
        tokens, slots = walk(branches, pick_at, first_slots)
        if len(slots) > 1:
            accepted_by["copy" if slots[-1] >= first_slots[1] else "drafter"] += 1
        return tokens, slots

    monkeypatch.setattr(loop, "walk", counting_walk)
    n_samples = 4000
    torch.manual_seed(3)
    out = target.generate(
        ids.expand(n_samples, -1), assistant_model=make_bad_drafter(target, fixed_token=2), block_policy=3,
        prompt_lookup_num_tokens=3, do_sample=True, max_new_tokens=4, temperature=0.9,
    )
    assert min(accepted_by.values()) > n_samples // 40, accepted_by
    p_spec = goodness_of_fit(count(out[:, ids.shape[1] :].tolist()), exact, n_samples)
    assert p_spec > ALPHA, f"sampling with the copy branch is not distributed like the target (p={p_spec:.2g})"


def test_greedy_is_unchanged_by_the_longer_chain_shortcut(llama, monkeypatch):
    """The shortcut above is exact for greedy picks (the test that catches it must be the sampling one)."""
    ids = repeating_prompt(0)
    expected = llama.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    monkeypatch.setattr(loop, "walk", longest_chain)
    out = llama.generate(
        ids, assistant_model=drafter_of("oracle_corrupt", llama, ids), block_policy=4, prompt_lookup_num_tokens=5,
        do_sample=False, max_new_tokens=N_NEW,
    )
    assert_same(expected, out)


# ----------------------------------------------------------------------------------------------- bad input


def test_copy_settings_are_checked(llama):
    ids = make_prompt(0)
    drafter = make_drafter(llama, seed=1)
    with pytest.raises(ValueError, match="max_block_size"):
        llama.generate(ids, assistant_model=drafter, prompt_lookup_num_tokens=drafter.config.max_block_size + 1)
    with pytest.raises(ValueError, match="whole number"):
        llama.generate(ids, assistant_model=drafter, prompt_lookup_num_tokens=2.5)

