"""A drafter in another dtype than its target: bf16 next to an fp32 target (what `load_default` picks on CPUs with
fast bf16 matmuls). The target still verifies every token in fp32, so output must not change; only the proposals are
scored by a bf16 copy of the target's LM head.
"""

import argparse
import copy

import pytest
import torch

from blockpilot_hf.cli import load_drafter_and_policy
from blockpilot_hf.compat import has_native_dflash
from blockpilot_hf.decoding import workspace_for
from blockpilot_hf.modeling_drafter import draft_head, drafter_dtype_for, has_fast_bf16
from blockpilot_hf.training.labels import replay_acceptance
from helpers.decoding import workspaces
from helpers.models import greedy_reference, make_prompt

N_NEW = 20


@pytest.fixture(scope="module")
def bf16_setup(trained_setup):
    target, drafter, _, output_dir = trained_setup
    return target, copy.deepcopy(drafter).to(torch.bfloat16), output_dir


def test_draft_head_is_the_targets_own_or_a_frozen_copy(trained_setup, bf16_setup):
    target, fp32_drafter, _, _ = trained_setup
    _, bf16_drafter, _ = bf16_setup
    assert draft_head(target, fp32_drafter) is target.get_output_embeddings()
    head = draft_head(target, bf16_drafter)
    assert head.weight.dtype == torch.bfloat16 and not head.weight.requires_grad
    assert torch.equal(head.weight, target.get_output_embeddings().weight.to(torch.bfloat16))
    assert target.get_output_embeddings().weight.dtype == torch.float32  # the target's own head is untouched


@pytest.mark.parametrize("block_size", (2, 4))
@pytest.mark.parametrize("seed", (100, 103, 900))
def test_bf16_drafter_greedy_equals_plain(bf16_setup, seed, block_size):
    target, drafter, _ = bf16_setup
    ids = make_prompt(seed, length=6)
    expected = greedy_reference(target, ids, N_NEW)
    out = target.generate(
        ids, assistant_model=drafter, block_policy=block_size, do_sample=False, max_new_tokens=N_NEW,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    if seed < 900:  # a training prompt: the bf16 drafter must still get proposals accepted
        assert max(out.acceptance_lengths[0]) > 1


def test_bf16_drafter_ragged_batch_equals_plain_batch(bf16_setup):
    target, drafter, _ = bf16_setup
    ids = make_prompt(101, length=8, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    out = target.generate(
        ids, attention_mask=mask, assistant_model=drafter, block_policy=4, do_sample=False, max_new_tokens=N_NEW
    )
    assert torch.equal(out, expected)
    own = [w for w in workspaces(target) if w.drafter is drafter]
    assert own and all(w.draft_head.weight.dtype == torch.bfloat16 for w in own)


def test_replay_equals_the_loop_with_a_bf16_drafter(bf16_setup):
    target, drafter, _ = bf16_setup
    ids = make_prompt(100, length=6)
    reference = greedy_reference(target, ids, N_NEW)
    replay = replay_acceptance(target, drafter, reference, ids.shape[1], [2, 4], max_length=reference.shape[1])
    for block_size in (2, 4):
        out = target.generate(
            ids, assistant_model=drafter, block_policy=block_size, do_sample=False, max_new_tokens=N_NEW,
            return_dict_in_generate=True,
        )
        assert replay.acceptance_lengths[block_size] == out.acceptance_lengths[0]


@pytest.mark.skipif(not has_native_dflash(), reason="this transformers has no speculation_type='dflash'")
def test_bf16_drafter_in_transformers_native_path(bf16_setup):
    # transformers applies the target's fp32 head to the drafter's output as is: the drafter hands it back in fp32.
    target, drafter, _ = bf16_setup
    ids = make_prompt(102, length=6)
    out = target.generate(ids, assistant_model=drafter, speculation_type="dflash", do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, greedy_reference(target, ids, N_NEW))


def test_drafter_dtype_for_follows_the_target_and_the_hardware(trained_setup):
    target, _, _, _ = trained_setup
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert has_fast_bf16("cpu") == fast_bf16
    assert drafter_dtype_for(target) == (torch.bfloat16 if fast_bf16 else torch.float32)
    half = copy.deepcopy(target).to(torch.float16)
    assert drafter_dtype_for(half) == torch.float16  # a low-precision target: the drafter matches it


@pytest.mark.parametrize("flag, expected", (("bf16", torch.bfloat16), ("fp32", torch.float32)))
def test_cli_drafter_dtype_flag(trained_setup, flag, expected):
    target, _, _, output_dir = trained_setup
    args = argparse.Namespace(target="tiny", drafter=str(output_dir), policy=None, drafter_dtype=flag)
    drafter, policy = load_drafter_and_policy(args, target)
    assert drafter.dtype == expected and policy is None


def test_workspaces_of_fp32_and_bf16_drafters_are_kept_apart(trained_setup, bf16_setup):
    target, fp32_drafter, _, _ = trained_setup
    _, bf16_drafter, _ = bf16_setup
    a = workspace_for(target, fp32_drafter, 1, 256, False)
    b = workspace_for(target, bf16_drafter, 1, 256, False)
    assert a is not b
    assert a.draft_head is target.get_output_embeddings() and b.draft_head.weight.dtype == torch.bfloat16


def test_workspaces_of_one_pair_share_the_head_copy(trained_setup):
    target, drafter, _, _ = trained_setup
    drafter = copy.deepcopy(drafter).to(torch.bfloat16)
    first = workspace_for(target, drafter, 1, 256, False)
    second = workspace_for(target, drafter, 2, 512, False)
    assert first is not second and second.draft_head is first.draft_head
