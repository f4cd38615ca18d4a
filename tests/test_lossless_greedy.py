"""Greedy decoding is lossless: the speculative path returns exactly `target.generate(ids, do_sample=False, ...)`.

Checked over targets (Llama, Qwen3), seeds, drafters (random, clean oracle, corrupted oracle, a "bad" drafter that
always proposes one token), block sizes 1..20 and the stopping edges (EOS, max_new_tokens, max_length, stopping
criteria).
"""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import blockpilot_hf
from helpers.models import VOCAB, greedy_reference, make_drafter, make_prompt, make_target
from helpers.oracle import make_bad_drafter, make_oracle

DRAFTER_KINDS = ("random", "oracle", "oracle_corrupt", "bad")
N_NEW = 30


def build_drafter(kind, target, ids, max_new_tokens, seed=0, **generate_kwargs):
    if kind == "random":
        return make_drafter(target, seed=seed)
    if kind == "oracle":
        return make_oracle(target, ids, max_new_tokens, **generate_kwargs)
    if kind == "oracle_corrupt":
        return make_oracle(target, ids, max_new_tokens, corrupt_fraction=0.35, salt=seed, **generate_kwargs)
    if kind == "bad":
        # propose the token greedy decoding emits most often, so it is sometimes (not always) right
        ref = greedy_reference(target, ids, max_new_tokens, **generate_kwargs)[0, ids.shape[1] :]
        return make_bad_drafter(target, fixed_token=int(ref.bincount().argmax()))
    raise ValueError(kind)


def plain(target, ids, **kwargs):
    return target.generate(ids, do_sample=False, **kwargs)


def spec(target, ids, drafter, block_size, **kwargs):
    return target.generate(ids, assistant_model=drafter, block_policy=block_size, do_sample=False, **kwargs)


def assert_same(expected, actual):
    assert actual.shape == expected.shape, f"{actual.tolist()} != {expected.tolist()}"
    assert torch.equal(actual, expected), f"{actual.tolist()} != {expected.tolist()}"


# ----------------------------------------------------------------------------------------------- targets x drafters


@pytest.fixture(scope="module")
def llama_cases():
    """Per (seed, drafter kind): target, prompt, drafter, plain greedy output. Built once for the module."""
    target = make_target("llama", seed=0)
    cases = {}
    for seed in (0, 1):
        ids = make_prompt(seed, length=5 + 3 * seed)
        expected = plain(target, ids, max_new_tokens=N_NEW)
        for kind in DRAFTER_KINDS:
            cases[seed, kind] = (target, ids, build_drafter(kind, target, ids, N_NEW, seed=seed), expected)
    return cases


@pytest.mark.parametrize("block_size", range(1, 21))
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
@pytest.mark.parametrize("seed", (0, 1))
def test_llama_all_block_sizes(llama_cases, seed, kind, block_size):
    target, ids, drafter, expected = llama_cases[seed, kind]
    assert_same(expected, spec(target, ids, drafter, block_size, max_new_tokens=N_NEW))


@pytest.fixture(scope="module")
def other_targets():
    return {
        "qwen3": make_target("qwen3", seed=1, hidden_size=64, num_layers=3),
        "llama_mha_4layers": make_target("llama", seed=2, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4),
    }


@pytest.mark.parametrize("block_size", (1, 2, 3, 5, 8, 13, 20))
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("name", ("qwen3", "llama_mha_4layers"))
def test_other_targets_block_subset(other_targets, name, seed, kind, block_size):
    target = other_targets[name]
    ids = make_prompt(seed + 10, length=6)
    drafter = build_drafter(kind, target, ids, N_NEW, seed=seed)
    assert_same(plain(target, ids, max_new_tokens=N_NEW), spec(target, ids, drafter, block_size, max_new_tokens=N_NEW))


# ----------------------------------------------------------------------------------------------- EOS


def first_new_token_at(reference, prompt_len, lo, hi):
    """A token whose first occurrence in the continuation is at index in [lo, hi) (0 = first new token)."""
    continuation = reference[0, prompt_len:].tolist()
    for i in range(lo, hi):
        if continuation[i] not in continuation[:i]:
            return continuation[i], i
    pytest.skip("no fresh token in range")  # pragma: no cover - the seeds below are chosen so this never happens


@pytest.fixture(scope="module")
def eos_setup():
    target = make_target("llama", seed=0)
    ids = make_prompt(3, length=6)
    reference = greedy_reference(target, ids, N_NEW)
    return target, ids, reference


@pytest.mark.parametrize("block_size", (1, 2, 4, 7, 16))
@pytest.mark.parametrize("kind", ("oracle", "oracle_corrupt", "random"))
def test_eos_mid_generation(eos_setup, kind, block_size):
    target, ids, reference = eos_setup
    eos, index = first_new_token_at(reference, ids.shape[1], 5, 20)
    drafter = build_drafter(kind, target, ids, N_NEW)
    expected = plain(target, ids, max_new_tokens=N_NEW, eos_token_id=eos)
    assert expected.shape[1] == ids.shape[1] + index + 1 and expected[0, -1] == eos  # really stops mid-way
    out = spec(target, ids, drafter, block_size, max_new_tokens=N_NEW, eos_token_id=eos, return_dict_in_generate=True)
    assert_same(expected, out.sequences)
    assert 1 + sum(out.acceptance_lengths[0]) == index + 1


def test_eos_list_first_hit_wins(eos_setup):
    target, ids, reference = eos_setup
    a, ia = first_new_token_at(reference, ids.shape[1], 4, 12)
    b, ib = first_new_token_at(reference, ids.shape[1], ia + 3, 25)
    drafter = build_drafter("oracle", target, ids, N_NEW)
    for eos_list in ([b, a], [a, b], [VOCAB - 2, b]):
        expected = plain(target, ids, max_new_tokens=N_NEW, eos_token_id=eos_list)
        for block_size in (3, 8, 20):
            assert_same(expected, spec(target, ids, drafter, block_size, max_new_tokens=N_NEW, eos_token_id=eos_list))
    assert plain(target, ids, max_new_tokens=N_NEW, eos_token_id=[b, a]).shape[1] == ids.shape[1] + ia + 1


def test_eos_from_target_generation_config(eos_setup):
    """EOS configured on the model (not passed to generate) stops both paths at the same place."""
    _, ids, reference = eos_setup
    eos, index = first_new_token_at(reference, ids.shape[1], 8, 20)
    target = make_target("llama", seed=0, eos_token_id=eos)  # same weights as eos_setup's target
    drafter = build_drafter("oracle", target, ids, N_NEW)
    expected = plain(target, ids, max_new_tokens=N_NEW)
    assert expected.shape[1] == ids.shape[1] + index + 1
    for block_size in (2, 5, 16):
        assert_same(expected, spec(target, ids, drafter, block_size, max_new_tokens=N_NEW))


def test_eos_is_first_new_token(eos_setup):
    target, ids, reference = eos_setup
    eos = int(reference[0, ids.shape[1]])
    drafter = build_drafter("oracle", target, ids, N_NEW)
    expected = plain(target, ids, max_new_tokens=N_NEW, eos_token_id=eos)
    assert expected.shape[1] == ids.shape[1] + 1
    out = spec(target, ids, drafter, 8, max_new_tokens=N_NEW, eos_token_id=eos, return_dict_in_generate=True)
    assert_same(expected, out.sequences)
    assert out.acceptance_lengths == [[]]


def test_min_new_tokens_suppresses_early_eos(eos_setup):
    """MinNewTokensLengthLogitsProcessor is position dependent: it must see each block position's own prefix."""
    target, ids, reference = eos_setup
    eos, index = first_new_token_at(reference, ids.shape[1], 2, 8)
    kwargs = dict(max_new_tokens=N_NEW, eos_token_id=eos, min_new_tokens=index + 4)
    expected = plain(target, ids, **kwargs)
    assert expected.shape[1] > ids.shape[1] + index + 1  # the early EOS was suppressed
    for kind in ("random", "oracle_corrupt"):
        drafter = build_drafter(kind, target, ids, N_NEW, eos_token_id=eos, min_new_tokens=index + 4)
        for block_size in (2, 6, 12):
            assert_same(expected, spec(target, ids, drafter, block_size, **kwargs))


# ----------------------------------------------------------------------------------------------- length edges


@pytest.fixture(scope="module")
def length_setup():
    target = make_target("llama", seed=0)
    ids = make_prompt(4, length=5)
    return target, ids, {kind: build_drafter(kind, target, ids, N_NEW) for kind in ("oracle", "oracle_corrupt", "random")}


@pytest.mark.parametrize("max_new_tokens", (1, 2, 3, 5))
@pytest.mark.parametrize("block_size", (1, 2, 4, 20))
def test_max_new_tokens_edges(length_setup, max_new_tokens, block_size):
    target, ids, drafters = length_setup
    expected = plain(target, ids, max_new_tokens=max_new_tokens)
    assert expected.shape[1] == ids.shape[1] + max_new_tokens
    for drafter in drafters.values():
        out = spec(target, ids, drafter, block_size, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
        assert_same(expected, out.sequences)
        assert all(1 <= a <= block_size for a in out.acceptance_lengths[0])


@pytest.mark.parametrize("extra", (1, 2, 6, 11))
@pytest.mark.parametrize("block_size", (3, 8, 16))
def test_max_length_edges(length_setup, extra, block_size):
    target, ids, drafters = length_setup
    max_length = ids.shape[1] + extra
    expected = plain(target, ids, max_length=max_length)
    assert expected.shape[1] == max_length
    for drafter in drafters.values():
        assert_same(expected, spec(target, ids, drafter, block_size, max_length=max_length))


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("block_size", (2, 5, 16))
def test_custom_stopping_criteria(eos_setup, block_size):
    target, ids, reference = eos_setup
    stop, index = first_new_token_at(reference, ids.shape[1], 6, 20)
    expected = plain(target, ids, max_new_tokens=N_NEW, stopping_criteria=StoppingCriteriaList([StopOnToken(stop)]))
    assert expected.shape[1] == ids.shape[1] + index + 1
    for kind in ("oracle", "oracle_corrupt"):
        drafter = build_drafter(kind, target, ids, N_NEW)
        criteria = StoppingCriteriaList([StopOnToken(stop)])
        assert_same(expected, spec(target, ids, drafter, block_size, max_new_tokens=N_NEW, stopping_criteria=criteria))
        assert criteria[0].calls == index + 1  # called once per committed token, as in plain decoding


# ----------------------------------------------------------------------------------------------- call forms


@pytest.mark.parametrize("block_size", (1, 4, 9))
def test_explicit_all_ones_attention_mask(length_setup, block_size):
    target, ids, drafters = length_setup
    mask = torch.ones_like(ids)
    expected = plain(target, ids, attention_mask=mask, max_new_tokens=N_NEW)
    assert_same(plain(target, ids, max_new_tokens=N_NEW), expected)
    for drafter in drafters.values():
        assert_same(expected, spec(target, ids, drafter, block_size, attention_mask=mask, max_new_tokens=N_NEW))


@pytest.mark.parametrize("block_size", (None, 1, 5, 17))
def test_custom_generate_form_on_unpatched_model(block_size):
    target = make_target("llama", seed=0, enable=False)
    ids = make_prompt(5, length=6)
    assert "generate" not in vars(target)
    expected = plain(target, ids, max_new_tokens=N_NEW)
    for kind in ("oracle", "oracle_corrupt", "random"):
        drafter = build_drafter(kind, target, ids, N_NEW)
        kwargs = {} if block_size is None else {"block_policy": block_size}
        out = target.generate(
            ids,
            custom_generate=blockpilot_hf.speculative_generate,
            drafter=drafter,
            do_sample=False,
            max_new_tokens=N_NEW,
            **kwargs,
        )
        assert_same(expected, out)


@pytest.mark.parametrize("block_size", (2, 6, 15))
def test_repetition_penalty_and_no_repeat_ngram_greedy(block_size):
    """Position-dependent processors must see, at every block position, the prefix that position would have seen."""
    target = make_target("llama", seed=0)
    ids = make_prompt(6, length=6)
    kwargs = dict(max_new_tokens=N_NEW, repetition_penalty=1.5, no_repeat_ngram_size=2)
    expected = plain(target, ids, **kwargs)
    assert not torch.equal(expected, plain(target, ids, max_new_tokens=N_NEW))  # the processors matter here
    for kind in ("oracle", "oracle_corrupt", "random"):
        drafter = build_drafter(kind, target, ids, N_NEW, repetition_penalty=1.5, no_repeat_ngram_size=2)
        assert_same(expected, spec(target, ids, drafter, block_size, **kwargs))


@pytest.mark.parametrize("block_size", (1, 3, 8))
def test_left_padded_prompt(block_size):
    """A batch-1 prompt with left padding (attention_mask zeros) follows plain generate's positions and masking."""
    target = make_target("llama", seed=0)
    ids = make_prompt(7, length=8)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    expected = plain(target, ids, attention_mask=mask, max_new_tokens=N_NEW)
    for kind in ("random", "oracle_corrupt"):
        drafter = build_drafter(kind, target, ids, N_NEW, attention_mask=mask)
        assert_same(expected, spec(target, ids, drafter, block_size, attention_mask=mask, max_new_tokens=N_NEW))
