"""The drafter itself: checkpoints (ours and z-lab's), the block layout, the draft KV cache, and the native transformers
DFlash path."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from blockpilot_hf import DFlashDrafter, DFlashDrafterConfig
from blockpilot_hf.compat import has_native_dflash
from blockpilot_hf.decoding import DecodingWorkspace, DraftStep
from blockpilot_hf.layout import IGNORE_INDEX, block_labels, block_loss_weights, build_block_layout
from blockpilot_hf.modeling_drafter import save_zlab_format
from conftest import draft_from_scratch, make_drafter, make_oracle, make_prompt, make_target

N_NEW = 24


@pytest.fixture(scope="module")
def qwen3():
    return make_target("qwen3", seed=1, hidden_size=64, num_layers=3)


@pytest.fixture(scope="module")
def drafter(qwen3):
    d = make_drafter(qwen3, num_layers=2, block_size=5, seed=3)
    with torch.no_grad():  # non-trivial norms so a wrongly loaded norm weight shows up
        for name, p in d.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return d


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


def test_save_pretrained_round_trip(tmp_path, qwen3, drafter):
    drafter.save_pretrained(tmp_path)
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DFlashDrafter)
    for field in ("block_size", "target_layer_ids", "mask_token_id", "num_target_layers", "target_vocab_size",
                  "hidden_size", "head_dim", "rope_theta", "max_block_size"):
        assert getattr(loaded.config, field) == getattr(drafter.config, field), field
    assert_same_drafter(drafter, loaded, qwen3, make_prompt(0))


def test_auto_classes_after_import(tmp_path, qwen3, drafter):
    drafter.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DFlashDrafterConfig)
    model = AutoModel.from_pretrained(tmp_path).eval()
    assert type(model) is DFlashDrafter
    assert_same_drafter(drafter, model, qwen3, make_prompt(1))


# ----------------------------------------------------------------------------------------------- z-lab format


def test_save_zlab_format_round_trip(tmp_path, qwen3, drafter):
    save_zlab_format(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"]
    assert raw["model_type"] == "qwen3"
    assert raw["dflash_config"] == {"mask_token_id": drafter.config.mask_token_id,
                                    "target_layer_ids": drafter.config.target_layer_ids}
    assert raw["block_size"] == 5 and raw["num_target_layers"] == 3
    assert set(load_file(tmp_path / "model.safetensors")) == set(drafter.state_dict())
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert loaded.config.model_type == "dflash_drafter"
    assert_same_drafter(drafter, loaded, qwen3, make_prompt(2))


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


def test_hand_written_zlab_checkpoint_loads_without_remote_code(tmp_path, qwen3, drafter):
    write_checkpoint(tmp_path, zlab_config(drafter), drafter.state_dict())
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    c = loaded.config
    assert (c.block_size, c.mask_token_id, c.target_layer_ids, c.num_target_layers) == (
        5, drafter.config.mask_token_id, drafter.config.target_layer_ids, 3)
    assert c.use_qk_norm and c.head_dim == drafter.config.head_dim
    assert_same_drafter(drafter, loaded, qwen3, make_prompt(3))


def test_bf16_zlab_checkpoint_serves_an_fp32_target(tmp_path, qwen3, drafter):
    """z-lab ships bf16 drafts: they load in bf16 and still decode losslessly for a target of another dtype."""
    state = {k: v.to(torch.bfloat16) for k, v in drafter.state_dict().items()}
    write_checkpoint(tmp_path, zlab_config(drafter, dtype="bfloat16"), state)
    loaded = DFlashDrafter.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.bfloat16
    ids = make_prompt(8)
    out = qwen3.generate(ids, assistant_model=loaded, do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, qwen3.generate(ids, do_sample=False, max_new_tokens=N_NEW))


def test_zlab_checkpoint_without_mask_token_is_refused(tmp_path, drafter):
    config = zlab_config(drafter, dflash_config={"target_layer_ids": list(drafter.config.target_layer_ids)})
    write_checkpoint(tmp_path, config, drafter.state_dict())
    with pytest.raises(ValueError, match="without `dflash_config.mask_token_id`"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_zlab_checkpoint_without_num_target_layers_is_refused(tmp_path, drafter):
    config = zlab_config(drafter)
    del config["num_target_layers"]
    write_checkpoint(tmp_path, config, drafter.state_dict())
    with pytest.raises(ValueError, match="lacks `num_target_layers`"):
        DFlashDrafter.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------- broken checkpoints


def test_corrupt_safetensors(tmp_path, drafter):
    drafter.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(ValueError, match="is corrupt or incompatible with its config"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path, drafter):
    drafter.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt or incompatible with its config"):
        DFlashDrafter.from_pretrained(tmp_path)


@pytest.mark.parametrize("zlab", (False, True))
def test_missing_weights(tmp_path, drafter, zlab):
    state = {k: v for k, v in drafter.state_dict().items() if k not in ("fc.weight", "layers.1.mlp.up_proj.weight")}
    if zlab:
        write_checkpoint(tmp_path, zlab_config(drafter), state)
    else:
        drafter.save_pretrained(tmp_path)
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match its config.*missing_keys.*fc\.weight"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_unexpected_weights(tmp_path, drafter):
    drafter.save_pretrained(tmp_path)
    state = dict(drafter.state_dict())
    state["layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match its config.*unexpected_keys"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_weights_of_another_shape(tmp_path, drafter):
    write_checkpoint(tmp_path, zlab_config(drafter, intermediate_size=drafter.config.intermediate_size * 2),
                     drafter.state_dict())
    with pytest.raises(ValueError, match="does not match its config|corrupt or incompatible"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(OSError, match="Could not load a DFlash drafter"):
        DFlashDrafter.from_pretrained(tmp_path / "does-not-exist")


# ----------------------------------------------------------------------------------------------- forward contract


def test_forward_input_checks(drafter):
    inputs = random_drafter_inputs(drafter)
    with pytest.raises(ValueError, match="noise_embeds has width"):
        drafter(**{**inputs, "noise_embeds": inputs["noise_embeds"][..., :-1]})
    with pytest.raises(ValueError, match="position_ids covers"):
        drafter(**{**inputs, "position_ids": inputs["position_ids"][:, 1:]})
    with torch.no_grad():
        plain = drafter(**inputs).last_hidden_state
        ones = drafter(**inputs, attention_mask=torch.ones(1, 11)).last_hidden_state
    torch.testing.assert_close(plain, ones, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- layout


def test_build_block_layout_decoding_case():
    layout = build_block_layout(torch.tensor([[42]]), torch.tensor([[9]]), block_size=4, mask_token_id=7)
    assert layout.input_ids.tolist() == [[42, 7, 7, 7]]
    assert layout.position_ids.tolist() == [[9, 10, 11, 12]]
    assert layout.attention_mask is None
    assert layout.block_size == 4


def test_build_block_layout_training_mask():
    anchors = torch.tensor([[2, 5, 3]])
    layout = build_block_layout(
        torch.tensor([[11, 12, 13]]), anchors, block_size=3, mask_token_id=0, context_positions=torch.arange(8)[None]
    )
    assert layout.input_ids.tolist() == [[11, 0, 0, 12, 0, 0, 13, 0, 0]]
    assert layout.position_ids.tolist() == [[2, 3, 4, 5, 6, 7, 3, 4, 5]]
    mask = layout.attention_mask
    assert mask.shape == (1, 1, 9, 8 + 9) and mask.dtype == torch.bool
    for q in range(9):
        block = q // 3
        anchor = int(anchors[0, block])
        # context keys: visible iff strictly before the query's anchor
        assert mask[0, 0, q, :8].tolist() == [j < anchor for j in range(8)]
        # block keys: the query's own block only (bidirectional inside it)
        assert mask[0, 0, q, 8:].tolist() == [k // 3 == block for k in range(9)]


def test_build_block_layout_padding_and_errors():
    layout = build_block_layout(
        torch.tensor([[5, 6]]), torch.tensor([[3, 4]]), block_size=2, mask_token_id=1,
        context_positions=torch.arange(5)[None], context_padding_mask=torch.tensor([[0, 1, 1, 1, 1]]),
    )
    assert layout.attention_mask[0, 0, 0, :5].tolist() == [False, True, True, False, False]
    assert layout.attention_mask[0, 0, 2, :5].tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        build_block_layout(torch.tensor([[1]]), torch.tensor([[0]]), block_size=0, mask_token_id=0)


def test_block_labels():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    labels = block_labels(ids, torch.tensor([[1, 4]]), block_size=4)
    assert labels.shape == (1, 2, 4)
    assert labels.tolist() == [[[IGNORE_INDEX, 12, 13, 14], [IGNORE_INDEX, 15, IGNORE_INDEX, IGNORE_INDEX]]]
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1]])  # e.g. prompt tokens excluded
    labels = block_labels(ids, torch.tensor([[1, 4]]), block_size=4, loss_mask=loss_mask)
    assert labels.tolist() == [[[IGNORE_INDEX, IGNORE_INDEX, 13, 14], [IGNORE_INDEX, 15, IGNORE_INDEX, IGNORE_INDEX]]]


def test_block_loss_weights():
    w = block_loss_weights(16)
    assert w.shape == (16,) and w[0] == 0 and w[1] == 1
    k = torch.arange(2, 16, dtype=torch.float32)
    torch.testing.assert_close(w[2:], torch.exp(-(k - 1) / 7.0))  # gamma = 7 for B = 16
    w = block_loss_weights(4, gamma=2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, torch.exp(torch.tensor(-0.5)), torch.exp(torch.tensor(-1.0))]))
    assert torch.all(w[1:-1] > w[2:])  # earlier positions weigh more


def test_training_layout_matches_decoding_forward(drafter):
    """Many blocks in one masked forward (training) give what one decoding forward per block gives."""
    gen = torch.Generator().manual_seed(0)
    ctx_len, block = 10, 4
    context = torch.randn(1, ctx_len, drafter.config.context_feature_size, generator=gen)
    embed = torch.nn.Embedding(drafter.config.target_vocab_size, drafter.config.hidden_size)
    anchors = torch.tensor([[2, 7, 4]])
    anchor_ids = torch.tensor([[5, 9, 13]])
    layout = build_block_layout(anchor_ids, anchors, block, drafter.config.mask_token_id,
                                context_positions=torch.arange(ctx_len)[None])
    with torch.no_grad():
        many = drafter(
            noise_embeds=embed(layout.input_ids), context_hidden_states=context,
            position_ids=torch.cat([torch.arange(ctx_len)[None], layout.position_ids], 1),
            attention_mask=layout.attention_mask,
        ).last_hidden_state
        for a in range(3):
            p = int(anchors[0, a])
            one = build_block_layout(anchor_ids[:, a : a + 1], anchors[:, a : a + 1], block, drafter.config.mask_token_id)
            single = drafter(
                noise_embeds=embed(one.input_ids), context_hidden_states=context[:, :p],
                position_ids=torch.cat([torch.arange(p)[None], one.position_ids], 1),
            ).last_hidden_state
            torch.testing.assert_close(many[:, a * block : (a + 1) * block], single, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- draft KV cache


def record_draft_calls(monkeypatch, target) -> list:
    """Every `DraftStep.run` inside the real loop: (anchor ids, anchor positions, proposals, row block sizes), and a
    `("shrink", rows)` entry whenever the batch moves to a smaller workspace (`DecodingWorkspace.take_rows`)."""
    # Steps bind `run` when they are built: drop workspaces kept from earlier calls so every step is built patched.
    target.__dict__.pop("_blockpilot_workspaces", None)
    calls = []
    original_run, original_take_rows = DraftStep.run, DecodingWorkspace.take_rows

    def recorded(self, *args, **kwargs):
        proposals = original_run(self, *args, **kwargs)
        calls.append((self.anchor_ids[:, 0].tolist(), self.anchor_positions[:, 0].tolist(), proposals.tolist(),
                      self.row_block_sizes.tolist(), getattr(self.drafter, "real_hidden", None)))
        return proposals

    def take_rows(self, source, rows):
        calls.append(("shrink", rows.tolist()))
        return original_take_rows(self, source, rows)

    monkeypatch.setattr(DraftStep, "run", recorded)
    monkeypatch.setattr(DecodingWorkspace, "take_rows", take_rows)
    return calls


def check_drafts_against_scratch(calls, target, drafter, sequences, prompt_mask):
    """Every proposal the loop made for a live sequence equals drafting that sequence's committed prefix from scratch.
    For an oracle drafter (whose proposals depend on the row, not on the computation) the real drafter's hidden states
    are compared instead. Returns how many (call, row) pairs were checked."""
    checked = 0
    request_rows = list(range(len(sequences)))  # the request row of each row of the current batch
    for call in calls:
        if call[0] == "shrink":
            request_rows = [request_rows[i] for i in call[1]]
            continue
        anchors, positions, proposals, sizes, real_hidden = call
        assert len(anchors) == len(request_rows)
        for i, (anchor, position) in enumerate(zip(anchors, positions)):
            row = request_rows[i]
            real = sequences[row][prompt_mask[row].bool().tolist() + [True] * (len(sequences[row]) - prompt_mask.shape[1])]
            assert real[position] == anchor, (row, position)
            expected = draft_from_scratch(target, drafter, real[None, : position + 1], sizes[i])
            if real_hidden is None:
                assert proposals[i][: sizes[i] - 1] == expected[0].tolist(), (row, position)
            else:
                torch.testing.assert_close(
                    real_hidden[i, : sizes[i]], drafter.real_hidden[0], rtol=1e-4, atol=1e-5, msg=str((row, position))
                )
            checked += 1
    return checked


@pytest.mark.parametrize("block_size", (2, 5))
def test_incremental_drafts_equal_drafting_from_scratch(monkeypatch, qwen3, drafter, block_size):
    """The static draft cache (context written at the target's slots, holes masked) gives, at every step of the real
    loop, exactly the proposals of a fresh forward over the committed prefix."""
    ids = make_prompt(4, length=6)
    calls = record_draft_calls(monkeypatch, qwen3)
    out = qwen3.generate(ids, assistant_model=drafter, block_policy=block_size, do_sample=False, max_new_tokens=N_NEW)
    monkeypatch.undo()
    checked = check_drafts_against_scratch(calls, qwen3, drafter, out, torch.ones_like(ids))
    assert checked == len(calls) > 3


def test_incremental_drafts_equal_drafting_from_scratch_in_a_ragged_batch(monkeypatch, qwen3):
    """Same in a left-padded batch whose rows accept different lengths (holes in the shared slots) and use different
    block sizes, including after the caches are compacted."""
    import blockpilot_hf.decoding as decoding

    ids = make_prompt(5, length=8, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    drafter = make_oracle(qwen3, ids, N_NEW, block_size=5, corrupt_fraction=0.5, attention_mask=mask)
    sizes = FixedSizes([5, 2, 4])
    monkeypatch.setattr(decoding, "cache_capacity", lambda prompt, new, block, batch: prompt + new + 6)
    compactions = []
    original_compact = decoding.DecodingWorkspace.compact
    monkeypatch.setattr(decoding.DecodingWorkspace, "compact", lambda self: compactions.append(1) or original_compact(self))
    calls = record_draft_calls(monkeypatch, qwen3)
    monkeypatch.setattr(qwen3.generation_config, "eos_token_id", None)
    out = qwen3.generate(ids, attention_mask=mask, assistant_model=drafter, block_policy=sizes, do_sample=False,
                         max_new_tokens=N_NEW)
    monkeypatch.undo()
    assert compactions, "the test must exercise compaction"
    shrinks = [call for call in calls if call[0] == "shrink"]
    assert shrinks, "the test must exercise a batch moving to a smaller workspace as rows finish"
    checked = check_drafts_against_scratch(calls, qwen3, drafter, out, mask)
    assert checked == sum(len(call[0]) for call in calls if call[0] != "shrink") > 30


class FixedSizes:
    """A `BlockSizePolicy` returning given sizes, one per row."""

    def __init__(self, sizes):
        self.sizes = sizes

    def choose_block_sizes(self, prefill):
        return torch.tensor(self.sizes)


# ----------------------------------------------------------------------------------------------- native path


@pytest.mark.skipif(not has_native_dflash(), reason="this transformers has no speculation_type='dflash'")
@pytest.mark.parametrize("kind", ("random", "oracle"))
def test_native_transformers_dflash_path(qwen3, drafter, kind):
    ids = make_prompt(7, length=6)
    if kind == "oracle":
        drafter = make_oracle(qwen3, ids, N_NEW, block_size=5)
    expected = qwen3.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    # `enable` leaves speculation_type="dflash" to stock transformers
    assert getattr(qwen3, "_blockpilot_enabled", False)
    out = qwen3.generate(ids, assistant_model=drafter, speculation_type="dflash", do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, expected)
    stock = make_target("qwen3", seed=1, hidden_size=64, num_layers=3, enable=False)
    out = stock.generate(ids, assistant_model=drafter, speculation_type="dflash", do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, expected)
    if kind == "oracle":
        # the native loop drives our drafter with the same positions: every block is fully accepted
        anchors = [a for a, _ in drafter.oracle_calls]
        assert anchors[:3] == [6, 11, 16]
