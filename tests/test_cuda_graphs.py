"""The CUDA-graph fast path gives exactly the eager path's output (and plain generate's), fp32, on a GPU.

Skipped without CUDA (CI has none); `results/current/gpu/device_run.sh` runs it on the H200.
"""

import pytest
import torch

import blockpilot_hf.decoding as decoding
from helpers.models import make_drafter, make_target, ragged_batch
from helpers.oracle import make_oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N_NEW = 40


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=0).cuda()


def ragged(seed, batch):
    ids, mask = ragged_batch(seed, batch=batch)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("batch", (1, 4))
@pytest.mark.parametrize("block_size", (1, 4, 7))
@pytest.mark.parametrize("kind", ("random", "oracle_corrupt"))
def test_graphs_equal_eager_and_plain(target, batch, block_size, kind):
    ids, mask = ragged(batch, batch)
    if kind == "random":
        drafter = make_drafter(target, block_size=8, seed=1).cuda()
    else:
        drafter = make_oracle(target.cpu(), ids.cpu(), N_NEW, block_size=8, corrupt_fraction=0.35,
                              attention_mask=mask.cpu())
        target.cuda()
        drafter = drafter.cuda()
        drafter._table = drafter._table.cuda()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    outputs = {}
    for backend in ("eager", "cuda_graphs", "cuda_graphs"):  # the second graph run replays the captured graphs
        out = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, block_policy=block_size, do_sample=False,
            max_new_tokens=N_NEW, decoding_backend=backend, return_dict_in_generate=True, output_scores=True,
        )
        assert torch.equal(out.sequences, expected), backend
        outputs.setdefault(backend, []).append(out)
    eager, graphs = outputs["eager"][0], outputs["cuda_graphs"]
    for out in graphs:
        assert out.acceptance_lengths == eager.acceptance_lengths
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores))


def test_graphs_are_captured_once_and_replayed(monkeypatch, target):
    ids, mask = ragged(0, 1)
    drafter = make_drafter(target, block_size=4, seed=2).cuda()
    captures = []
    original = decoding.StepGraph._capture
    monkeypatch.setattr(decoding.StepGraph, "_capture", lambda self: captures.append(1) or original(self))
    for _ in range(3):
        target.generate(ids, attention_mask=mask, assistant_model=drafter, block_policy=4, max_new_tokens=N_NEW,
                        do_sample=False)
    assert len(captures) == 2  # draft + verify, once
    other = make_drafter(target, block_size=4, seed=3).cuda()  # another drafter: its own workspace and graphs
    target.generate(ids, attention_mask=mask, assistant_model=other, block_policy=4, max_new_tokens=N_NEW,
                    do_sample=False)
    assert len(captures) == 4


@pytest.mark.parametrize("drafter_layers", (["sliding_attention", "full_attention"], ["sliding_attention"] * 2))
def test_graphs_with_sliding_windows(drafter_layers):
    """A target with sliding and full layers (Gemma 2) and a drafter whose sliding layers keep a ring of their window
    (`decoding.window_cache`): captured steps give the eager path's output, plain generate's, past several windows."""
    from helpers.models import sliding_target

    target = sliding_target("gemma2", window=4).cuda()
    drafter = make_drafter(
        target, num_layers=2, block_size=8, seed=1, layer_types=drafter_layers, sliding_window=3
    ).cuda()
    drafter.config.max_block_size = 8  # a ring of 11 positions, wrapping several times
    ids, mask = ragged(3, 4)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    runs = {}
    for backend in ("eager", "cuda_graphs", "cuda_graphs"):
        out = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, block_policy=4, do_sample=False, pad_token_id=0,
            max_new_tokens=N_NEW, decoding_backend=backend, return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, expected), backend
        runs.setdefault(backend, []).append(out.acceptance_lengths)
    assert all(lengths == runs["eager"][0] for lengths in runs["cuda_graphs"])


@pytest.mark.parametrize("block_size", (1, 3))
def test_graphs_with_copy_chain(target, block_size):
    """The two-chain verify tree (`prompt_lookup_num_tokens`) captured and replayed: the eager path's output and
    acceptance, plain generate's output, on a ragged batch whose prompts repeat themselves."""
    ids, mask = ragged(5, 4)
    ids = torch.cat([ids, ids[:, -6:], ids[:, -6:]], dim=1)
    mask = torch.cat([mask, torch.ones_like(ids[:, -12:])], dim=1)
    drafter = make_drafter(target, block_size=8, seed=1).cuda()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    runs = {}
    for backend in ("eager", "cuda_graphs", "cuda_graphs"):
        out = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=5,
            do_sample=False, max_new_tokens=N_NEW, decoding_backend=backend, return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, expected), backend
        runs.setdefault(backend, []).append(out.acceptance_lengths)
    assert all(lengths == runs["eager"][0] for lengths in runs["cuda_graphs"])
