"""Pytest fixtures and hooks for the blockpilot_hf tests. Plain helpers (model factories, oracle drafters, fakes) live
in the `helpers` package next to this file: `from helpers.models import make_target`.

Fixtures that train or load something are session-scoped; randomness is always seeded inside the fixtures.
"""

import pytest
import torch

from helpers.models import make_drafter, make_smol_target, make_target
from helpers.training import greedy_rows, tiny_training_args


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine makes multi-threaded OpenMP spin badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def qwen3_target():
    """A tiny Qwen3 target (qk-norm, hidden 64, 3 layers), one per test module."""
    return make_target("qwen3", seed=1, hidden_size=64, num_layers=3)


@pytest.fixture(scope="module")
def qwen3_drafter(qwen3_target):
    """A 2-layer block-5 drafter for `qwen3_target` with non-trivial norm weights, so that a wrongly loaded norm
    weight shows up."""
    d = make_drafter(qwen3_target, num_layers=2, block_size=5, seed=3)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return d


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="session")
def trained_setup(tmp_path_factory):
    """`(target, drafter, rows, output_dir)`: a 1-layer block-4 drafter trained 100 steps on its llama target's own
    greedy outputs (mean acceptance ~2.5 tokens per step), saved by `train_drafter` to `output_dir`."""
    from blockpilot_hf.training.drafter import train_drafter

    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 16)
    output_dir = tmp_path_factory.mktemp("trained_drafter")
    drafter = train_drafter(target, rows, tiny_training_args(output_dir))
    return target, drafter.eval(), rows, output_dir


# ----------------------------------------------------------------------------------------------- SmolLM2 vocabulary


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (converted from the shipped GGUF on first use, then read from the cache)."""
    from transformers import AutoTokenizer

    from blockpilot_hf.default_model import default_target_path

    return AutoTokenizer.from_pretrained(default_target_path())


@pytest.fixture(scope="session")
def saved_smol_target(tmp_path_factory, smol_tokenizer):
    """A directory with a tiny random SmolLM2-vocabulary Llama and the real tokenizer, loadable by `cli.load_target`."""
    path = tmp_path_factory.mktemp("smol_target")
    make_smol_target(seed=0, enable=False).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path
