"""Chi-square tests of sampled continuations against a target's exact (processed) sampling distribution, on a
vocab-8 target peaked enough that a few new tokens have few likely continuations."""

import torch

from helpers.models import make_target

ALPHA = 1e-3
VOCAB_8 = 8


def peaked_target():
    """A vocab-8 llama whose LM head is scaled so its distribution is peaked but far from deterministic."""
    return make_target("llama", seed=0, vocab_size=VOCAB_8, logit_scale=10.0)


def chi2_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution (scipy if installed, else the regularised gamma function)."""
    try:
        from scipy.stats import chi2

        return float(chi2.sf(statistic, dof))
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(statistic / 2.0, dtype=torch.float64)))


def goodness_of_fit(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
    """p-value of observed `counts` against `probs`; outcomes with small expected counts are pooled into one bin."""
    observed_outside = sum(c for k, c in counts.items() if probs.get(k, 0.0) == 0.0)
    assert observed_outside == 0, f"sampled {observed_outside} continuations the target gives probability 0"
    big = [k for k, p in probs.items() if p * n >= min_expected]
    bins_obs = [counts.get(k, 0) for k in big]
    bins_exp = [probs[k] * n for k in big]
    rest_exp = n - sum(bins_exp)
    if rest_exp >= min_expected:
        bins_obs.append(n - sum(bins_obs))
        bins_exp.append(rest_exp)
    elif bins_exp:  # fold a tiny remainder into the last bin so totals still match
        bins_obs[-1] += n - sum(bins_obs)
        bins_exp[-1] += rest_exp
    stat = sum((o - e) ** 2 / e for o, e in zip(bins_obs, bins_exp))
    return chi2_sf(stat, len(bins_exp) - 1)


def homogeneity(counts_a: dict, counts_b: dict, min_total: int = 10) -> float:
    """Two-sample chi-square test (2 x K contingency table); rare outcomes are pooled."""
    n_a, n_b = sum(counts_a.values()), sum(counts_b.values())
    keys = set(counts_a) | set(counts_b)
    big = [k for k in keys if counts_a.get(k, 0) + counts_b.get(k, 0) >= min_total]
    rows = [[counts_a.get(k, 0) for k in big], [counts_b.get(k, 0) for k in big]]
    rows[0].append(n_a - sum(rows[0]))
    rows[1].append(n_b - sum(rows[1]))
    cols = [a + b for a, b in zip(*rows)]
    keep = [j for j, c in enumerate(cols) if c > 0]
    stat = 0.0
    for row, n_row in zip(rows, (n_a, n_b)):
        for j in keep:
            e = n_row * cols[j] / (n_a + n_b)
            stat += (row[j] - e) ** 2 / e
    return chi2_sf(stat, len(keep) - 1)


def exact_distribution(target, ids, new_tokens: int, **sampling_kwargs) -> dict:
    """P(continuation) for every continuation of `new_tokens` tokens, from the target's processed scores.

    Each level is one batched `generate(max_new_tokens=1, output_scores=True)` over every prefix, so the processors are
    exactly the ones `generate` builds from `sampling_kwargs`.
    """
    probs = {(): 1.0}
    for level in range(new_tokens):
        prefixes = [prefix for prefix, p in probs.items() if p > 0.0]  # continuations of probability 0 stay 0
        batch = torch.cat([ids.expand(len(prefixes), -1), torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), level)], 1)
        out = target.generate(
            batch, do_sample=True, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, **sampling_kwargs
        )
        step = torch.softmax(out.scores[0].double(), dim=-1)
        probs = {
            prefix + (tok,): probs[prefix] * float(step[i, tok])
            for i, prefix in enumerate(prefixes)
            for tok in range(VOCAB_8)
        }
    total = sum(probs.values())
    assert abs(total - 1.0) < 1e-9
    return {k: v for k, v in probs.items() if v > 0.0}


def count(rows) -> dict:
    counts = {}
    for row in rows:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts
