"""Hub integration without a network: publishing dry runs and loading drafters/policies by Hub id from a cache."""

import huggingface_hub.constants
import pytest
import torch

from blockpilot_hf import BlockPolicy, DFlashDrafter
from blockpilot_hf.hub import publish
from helpers.models import make_drafter, make_target

CARD = """---
library_name: blockpilot_hf
tags:
- speculative-decoding
---

# A tiny test drafter

Trained on nothing; used by the test suite.
"""


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=0)


@pytest.fixture
def saved_drafter(tmp_path, target):
    folder = tmp_path / "tiny-drafter"
    drafter = make_drafter(target, block_size=4)
    drafter.save_pretrained(folder)
    return folder, drafter


def test_publish_dry_run_lists_exactly_the_artifacts(saved_drafter, capsys):
    folder, _ = saved_drafter
    (folder / "README.md").write_text(CARD)
    (folder / "notes.txt").write_text("not an artifact")
    paths = publish(folder, "user/repo", dry_run=True)
    assert paths == ["README.md", "config.json", "model.safetensors"]
    out = capsys.readouterr().out
    assert "would upload README.md" in out and "would upload model.safetensors" in out


def test_publish_without_a_card_is_refused(saved_drafter):
    folder, _ = saved_drafter
    with pytest.raises(FileNotFoundError, match="No model card for .*tiny-drafter.*README.md"):
        publish(folder, "user/repo", dry_run=True)


def test_publish_an_unsaved_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json: save the drafter/policy with `save_pretrained`"):
        publish(tmp_path, "user/repo", dry_run=True)


# ----------------------------------------------------------------------------------------------- offline loading


def add_to_cache(cache, repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out `folder`'s files the way huggingface_hub caches a downloaded snapshot of `repo_id`."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; transformers reads them from this module at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_drafter_and_policy_by_hub_id_offline(tmp_path, target, saved_drafter, offline_cache):
    folder, drafter = saved_drafter
    torch.manual_seed(0)
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2, 3, 4], hidden_size=16).eval()
    policy_folder = tmp_path / "tiny-policy"
    policy.save_pretrained(policy_folder)
    add_to_cache(offline_cache, "org/name", folder)
    add_to_cache(offline_cache, "org/name2", policy_folder)

    loaded = DFlashDrafter.from_pretrained("org/name")
    assert loaded.config.block_size == 4
    for key, value in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    loaded_policy = BlockPolicy.from_pretrained("org/name2")
    assert loaded_policy.config.candidate_block_sizes == [2, 3, 4]
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(loaded_policy.state_dict()[key], value, rtol=0, atol=0)

    # and they serve generate straight from the cache
    ids = torch.tensor([[5, 6, 7, 8]])
    out = target.generate(ids, assistant_model=loaded.eval(), block_policy=loaded_policy, max_new_tokens=5,
                          return_dict_in_generate=True)
    assert out.block_sizes[0] in (2, 3, 4)


def test_unknown_hub_id_offline_says_so(offline_cache):
    with pytest.raises(OSError) as info:
        DFlashDrafter.from_pretrained("org/not-in-cache")
    message = str(info.value)
    assert "org/not-in-cache" in message
    assert "offline" in message.lower() and "cache" in message.lower()
    with pytest.raises(OSError) as info:
        BlockPolicy.from_pretrained("org/not-in-cache")
    message = str(info.value).lower()  # transformers' own message
    assert "offline" in message and "cache" in message
