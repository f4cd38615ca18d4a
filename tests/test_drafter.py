"""The drafter itself (`modeling_drafter.py`): checkpoints (ours and z-lab's), broken checkpoints, the forward's input
contract, and the native transformers DFlash path. (The block layout is in `test_layout.py`, the draft KV cache the
decoding loop keeps in `test_decoding.py`.)"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from blockpilot_hf import DFlashDrafter, DFlashDrafterConfig
from blockpilot_hf.compat import has_native_dflash
from blockpilot_hf.modeling_drafter import save_zlab_format
from helpers.models import make_prompt, make_target
from helpers.oracle import make_oracle

N_NEW = 24


def random_drafter_inputs(d, ctx_len=6, block=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        noise_embeds=torch.randn(1, block, d.config.hidden_size, generator=gen),
        context_hidden_states=torch.randn(1, ctx_len, d.config.context_feature_size, generator=gen),
        position_ids=torch.arange(ctx_len + block)[None],
    )


def assert_same_drafter(a, b, target, ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    inputs = random_drafter_inputs(a)
    with torch.no_grad():
        torch.testing.assert_close(a(**inputs).last_hidden_state, b(**inputs).last_hidden_state, rtol=0, atol=0)
    outs = [
        target.generate(ids, assistant_model=d, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
        for d in (a, b)
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].acceptance_lengths == outs[1].acceptance_lengths


# ----------------------------------------------------------------------------------------------- our format


def test_save_pretrained_round_trip(tmp_path, qwen3_target, qwen3_drafter):
    qwen3_drafter.save_pretrained(tmp_path)
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DFlashDrafter)
    for field in ("block_size", "target_layer_ids", "mask_token_id", "num_target_layers", "target_vocab_size",
                  "hidden_size", "head_dim", "rope_theta", "max_block_size"):
        assert getattr(loaded.config, field) == getattr(qwen3_drafter.config, field), field
    assert_same_drafter(qwen3_drafter, loaded, qwen3_target, make_prompt(0))


def test_auto_classes_after_import(tmp_path, qwen3_target, qwen3_drafter):
    qwen3_drafter.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DFlashDrafterConfig)
    model = AutoModel.from_pretrained(tmp_path).eval()
    assert type(model) is DFlashDrafter
    assert_same_drafter(qwen3_drafter, model, qwen3_target, make_prompt(1))


# ----------------------------------------------------------------------------------------------- z-lab format


def test_save_zlab_format_round_trip(tmp_path, qwen3_target, qwen3_drafter):
    save_zlab_format(qwen3_drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"]
    assert raw["model_type"] == "qwen3"
    assert raw["dflash_config"] == {"mask_token_id": qwen3_drafter.config.mask_token_id,
                                    "target_layer_ids": qwen3_drafter.config.target_layer_ids}
    assert raw["block_size"] == 5 and raw["num_target_layers"] == 3
    assert set(load_file(tmp_path / "model.safetensors")) == set(qwen3_drafter.state_dict())
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert loaded.config.model_type == "dflash_drafter"
    assert_same_drafter(qwen3_drafter, loaded, qwen3_target, make_prompt(2))


def zlab_config(d: DFlashDrafter, **overrides) -> dict:
    """A config.json laid out like z-lab's published DFlash drafts (e.g. z-lab/Qwen3-4B-DFlash-b16), tiny sizes."""
    c = d.config
    raw = {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": c.block_size,
        "bos_token_id": None,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)},
        "dtype": "float32",
        "eos_token_id": None,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_types": ["full_attention"] * c.num_hidden_layers,
        "max_position_embeddings": 512,
        "max_window_layers": c.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "num_target_layers": c.num_target_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": c.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": c.target_vocab_size,
    }
    raw.update(overrides)
    return raw


def write_checkpoint(path, config: dict, state: dict):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def test_hand_written_zlab_checkpoint_loads_without_remote_code(tmp_path, qwen3_target, qwen3_drafter):
    write_checkpoint(tmp_path, zlab_config(qwen3_drafter), qwen3_drafter.state_dict())
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    c = loaded.config
    assert (c.block_size, c.mask_token_id, c.target_layer_ids, c.num_target_layers) == (
        5, qwen3_drafter.config.mask_token_id, qwen3_drafter.config.target_layer_ids, 3)
    assert c.use_qk_norm and c.head_dim == qwen3_drafter.config.head_dim
    assert_same_drafter(qwen3_drafter, loaded, qwen3_target, make_prompt(3))


def test_bf16_zlab_checkpoint_serves_an_fp32_target(tmp_path, qwen3_target, qwen3_drafter):
    """z-lab ships bf16 drafts: they load in bf16 and still decode losslessly for a target of another dtype."""
    state = {k: v.to(torch.bfloat16) for k, v in qwen3_drafter.state_dict().items()}
    write_checkpoint(tmp_path, zlab_config(qwen3_drafter, dtype="bfloat16"), state)
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.bfloat16
    ids = make_prompt(8)
    out = qwen3_target.generate(ids, assistant_model=loaded, do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, qwen3_target.generate(ids, do_sample=False, max_new_tokens=N_NEW))


def test_zlab_checkpoint_without_mask_token_is_refused(tmp_path, qwen3_drafter):
    layer_ids = list(qwen3_drafter.config.target_layer_ids)
    config = zlab_config(qwen3_drafter, dflash_config={"target_layer_ids": layer_ids})
    write_checkpoint(tmp_path, config, qwen3_drafter.state_dict())
    with pytest.raises(ValueError, match="without `dflash_config.mask_token_id`"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_zlab_checkpoint_without_num_target_layers_is_refused(tmp_path, qwen3_drafter):
    config = zlab_config(qwen3_drafter)
    del config["num_target_layers"]
    write_checkpoint(tmp_path, config, qwen3_drafter.state_dict())
    with pytest.raises(ValueError, match="lacks `num_target_layers`"):
        DFlashDrafter.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------- broken checkpoints


def test_corrupt_safetensors(tmp_path, qwen3_drafter):
    qwen3_drafter.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(ValueError, match="is corrupt or incompatible with its config"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path, qwen3_drafter):
    qwen3_drafter.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt or incompatible with its config"):
        DFlashDrafter.from_pretrained(tmp_path)


@pytest.mark.parametrize("zlab", (False, True))
def test_missing_weights(tmp_path, qwen3_drafter, zlab):
    missing = ("fc.weight", "layers.1.mlp.up_proj.weight")
    state = {k: v for k, v in qwen3_drafter.state_dict().items() if k not in missing}
    if zlab:
        write_checkpoint(tmp_path, zlab_config(qwen3_drafter), state)
    else:
        qwen3_drafter.save_pretrained(tmp_path)
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match its config.*missing_keys.*fc\.weight"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_unexpected_weights(tmp_path, qwen3_drafter):
    qwen3_drafter.save_pretrained(tmp_path)
    state = dict(qwen3_drafter.state_dict())
    state["layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match its config.*unexpected_keys"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_weights_of_another_shape(tmp_path, qwen3_drafter):
    config = zlab_config(qwen3_drafter, intermediate_size=qwen3_drafter.config.intermediate_size * 2)
    write_checkpoint(tmp_path, config, qwen3_drafter.state_dict())
    with pytest.raises(ValueError, match="does not match its config|corrupt or incompatible"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(OSError, match="Could not load a DFlash drafter"):
        DFlashDrafter.from_pretrained(tmp_path / "does-not-exist")


# ----------------------------------------------------------------------------------------------- forward contract


def test_forward_input_checks(qwen3_drafter):
    inputs = random_drafter_inputs(qwen3_drafter)
    with pytest.raises(ValueError, match="noise_embeds has width"):
        qwen3_drafter(**{**inputs, "noise_embeds": inputs["noise_embeds"][..., :-1]})
    with pytest.raises(ValueError, match="position_ids covers"):
        qwen3_drafter(**{**inputs, "position_ids": inputs["position_ids"][:, 1:]})
    with torch.no_grad():
        plain = qwen3_drafter(**inputs).last_hidden_state
        ones = qwen3_drafter(**inputs, attention_mask=torch.ones(1, 11)).last_hidden_state
    torch.testing.assert_close(plain, ones, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- native path


@pytest.mark.skipif(not has_native_dflash(), reason="this transformers has no speculation_type='dflash'")
@pytest.mark.parametrize("kind", ("random", "oracle"))
def test_native_transformers_dflash_path(qwen3_target, qwen3_drafter, kind):
    ids = make_prompt(7, length=6)
    drafter = make_oracle(qwen3_target, ids, N_NEW, block_size=5) if kind == "oracle" else qwen3_drafter
    expected = qwen3_target.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    # `enable` leaves speculation_type="dflash" to stock transformers
    assert getattr(qwen3_target, "_blockpilot_enabled", False)
    native = dict(assistant_model=drafter, speculation_type="dflash", do_sample=False, max_new_tokens=N_NEW)
    out = qwen3_target.generate(ids, **native)
    assert torch.equal(out, expected)
    stock = make_target("qwen3", seed=1, hidden_size=64, num_layers=3, enable=False)
    out = stock.generate(ids, **native)
    assert torch.equal(out, expected)
    if kind == "oracle":
        # the native loop drives our drafter with the same positions: every block is fully accepted
        anchors = [a for a, _ in drafter.oracle_calls]
        assert anchors[:3] == [6, 11, 16]
