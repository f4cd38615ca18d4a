"""Sampling is lossless: continuations sampled through the speculative path follow the target's own (processed)
distribution.

Setup: a vocab-8 target whose LM head is scaled so its distribution is peaked but far from deterministic, and a
corrupted oracle drafter (it proposes the greedy continuation, with a fixed fraction of positions corrupted), so
proposals are sometimes accepted and sometimes rejected, including mid-block.

Three chi-square tests per scenario, each at alpha = 1e-3: speculative vs the exact distribution (enumerated from the
target's processed scores), plain `generate` vs the exact distribution (checks the enumeration itself), and
speculative vs plain (two-sample homogeneity). Under the null hypothesis the chance that at least one of the three
fires is <= 3e-3 per seed; the seed is fixed, so the outcome is deterministic and a failure means a real difference
(or a change in torch's RNG stream hitting that 0.3% tail, in which case another seed will pass).
"""

import math
import time

import pytest
import torch

from helpers.models import make_prompt
from helpers.oracle import make_oracle
from helpers.sampling import (
    ALPHA,
    VOCAB_8,
    chi2_sf,
    count,
    exact_distribution,
    goodness_of_fit,
    homogeneity,
    peaked_target,
)


def test_chi2_sf_matches_known_values():
    assert math.isclose(chi2_sf(3.841458820694124, 1), 0.05, rel_tol=1e-6)
    assert math.isclose(chi2_sf(23.209251158954356, 10), 0.01, rel_tol=1e-6)


def run_scenario(new_tokens, n_samples, block_size, ids=None, **sampling_kwargs):
    target = peaked_target()
    ids = make_prompt(0, length=4, vocab_size=VOCAB_8) if ids is None else ids
    exact = exact_distribution(target, ids, new_tokens, **sampling_kwargs)
    drafter = make_oracle(target, ids, new_tokens, corrupt_fraction=0.3)

    torch.manual_seed(1234)
    plain_out = target.generate(ids.expand(n_samples, -1), do_sample=True, max_new_tokens=new_tokens, **sampling_kwargs)
    plain_counts = count(plain_out[:, ids.shape[1] :].tolist())

    spec_rows, accepted, rejected = [], 0, 0
    start = time.perf_counter()
    for _ in range(n_samples):
        out = target.generate(
            ids, assistant_model=drafter, block_policy=block_size, do_sample=True, max_new_tokens=new_tokens,
            return_dict_in_generate=True, **sampling_kwargs,
        )
        assert out.sequences.shape[1] == ids.shape[1] + new_tokens
        spec_rows.append(out.sequences[0, ids.shape[1] :].tolist())
        steps = out.acceptance_lengths[0]
        accepted += sum(a - 1 for a in steps)
        rejected += sum(1 for a in steps[:-1] if a < block_size)
    elapsed = time.perf_counter() - start
    spec_counts = count(spec_rows)

    # both acceptance and rejection paths were exercised, many times
    assert accepted > n_samples // 10 and rejected > n_samples // 10, (accepted, rejected)
    p_spec = goodness_of_fit(spec_counts, exact, n_samples)
    p_plain = goodness_of_fit(plain_counts, exact, n_samples)
    p_homog = homogeneity(spec_counts, plain_counts)
    print(f"{n_samples} speculative calls in {elapsed:.1f}s; p(spec|exact)={p_spec:.3g} p(plain|exact)={p_plain:.3g} "
          f"p(spec~plain)={p_homog:.3g}; {len(exact)} possible continuations")
    assert p_plain > ALPHA, "plain generate disagrees with the enumerated distribution: the test setup is wrong"
    assert p_spec > ALPHA, f"speculative sampling is not distributed like the target (p={p_spec:.2g})"
    assert p_homog > ALPHA, f"speculative and plain sampling differ (p={p_homog:.2g})"
    return exact


@pytest.mark.long
def test_sampling_temperature_top_p_matches_target():
    # 4 new tokens: the first from prefill, then a 3-token block (2 proposals), so acceptance can stop mid-block.
    run_scenario(new_tokens=4, n_samples=2000, block_size=4, temperature=0.7, top_p=0.9)


@pytest.mark.long
def test_sampling_with_repetition_penalty_matches_target():
    """Repetition penalty depends on each position's prefix, which inside a block includes accepted proposals.

    The prompt repeats one token so that most proposals are tokens not yet penalised: applying the processors with the
    block's start prefix at every position (a plausible bug) makes p(spec|exact) ~ 1e-17 here.
    """
    ids = torch.tensor([[5, 5, 5]])
    exact = run_scenario(new_tokens=3, n_samples=1500, block_size=3, ids=ids, repetition_penalty=2.5, temperature=0.8)
    target = peaked_target()
    without = exact_distribution(target, ids, 3, temperature=0.8)
    total_variation = 0.5 * sum(abs(exact.get(k, 0.0) - without.get(k, 0.0)) for k in set(exact) | set(without))
    assert total_variation > 0.2  # the penalty really changes the distribution


def test_sampling_without_drafting_in_one_batch_matches_target():
    """Block size 1, what the policy picks for batches where drafting does not pay: every row of one batch samples
    from the target's processed distribution through the speculative loop, with no proposals at all."""
    n_samples = 2000
    target = peaked_target()
    ids = make_prompt(0, length=4, vocab_size=VOCAB_8)
    exact = exact_distribution(target, ids, 3, temperature=0.7, top_p=0.9)
    drafter = make_oracle(target, ids, 3, corrupt_fraction=0.3)
    torch.manual_seed(99)
    out = target.generate(
        ids.expand(n_samples, -1), assistant_model=drafter, block_policy=1, do_sample=True, max_new_tokens=3,
        temperature=0.7, top_p=0.9, return_dict_in_generate=True,
    )
    assert out.block_sizes == [1] * n_samples
    assert all(steps == [1, 1] for steps in out.acceptance_lengths)  # one token per step after the prefill's
    p_spec = goodness_of_fit(count(out.sequences[:, ids.shape[1] :].tolist()), exact, n_samples)
    assert p_spec > ALPHA, f"batched sampling without drafting is not distributed like the target (p={p_spec:.2g})"
