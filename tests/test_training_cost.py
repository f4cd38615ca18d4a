"""What makes drafter training cheaper without changing what it learns: the target's features kept in a
`FeatureStore` (computed once, read back every epoch), the loss over a draft vocabulary's rows of the LM head, and
that loss a chunk of rows at a time without keeping the logits (`linear_cross_entropy`)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers.models import VOCAB, make_drafter, make_prompt, make_target
from helpers.training import drafter_block_outputs, greedy_rows, tiny_training_args

from blockpilot_hf.features import context_features
from blockpilot_hf.layout import block_labels, block_loss_weights, build_block_layout
from blockpilot_hf.training.drafter import (
    ResponseDataset,
    collate_right_padded,
    drafter_loss,
    sample_anchor_positions,
    train_drafter,
)
from blockpilot_hf.training.feature_store import FeatureStore, row_key
from blockpilot_hf.training.linear_cross_entropy import linear_cross_entropy


def _store(tmp_path, target, layer_ids=(0, 1), max_length=64):
    return FeatureStore(tmp_path / "features", target, list(layer_ids), max_length)


def test_stored_features_are_the_targets_own(tmp_path):
    """Read back, a row's features are what one target forward over the row gives (to bf16 precision), whatever
    rows shared its batch; rows longer than `max_length` are stored truncated, as training reads them."""
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 6, max_new_tokens=20) + greedy_rows(target, 3, max_new_tokens=40, seed=7)
    store = _store(tmp_path, target, max_length=40)
    assert store.add(target, rows, tokens_per_batch=100) == len(rows)
    for row in rows:
        ids = row["input_ids"][:40]
        with torch.no_grad():
            hidden = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
        expected = context_features(hidden, [0, 1])[0]
        stored = store.get(row_key(ids))
        assert stored.dtype == torch.bfloat16 and stored.shape == expected.shape
        torch.testing.assert_close(stored.float(), expected, rtol=1e-2, atol=1e-2)


def test_a_store_grows_with_its_data_and_is_read_back(tmp_path):
    target = make_target("llama", seed=0)
    first, later = greedy_rows(target, 5), greedy_rows(target, 4, seed=300)
    assert _store(tmp_path, target).add(target, first, rows_per_shard=2) == 5
    # A kill in the middle of a shard leaves a partial file: it is not read, its rows are computed again.
    (tmp_path / "features" / "shard-00009.partial").write_bytes(b"torn")
    reopened = _store(tmp_path, target)
    assert len(reopened) == 5
    assert reopened.add(target, first + later, rows_per_shard=2) == 4  # only the new rows
    assert len(_store(tmp_path, target)) == 9 and len(list((tmp_path / "features").glob("*.safetensors"))) == 5


def test_two_writers_share_a_store(tmp_path):
    """A generator putting features and a training run adding them write to one store at once: neither overwrites
    the other's shards, and neither computes a row the other stored."""
    target = make_target("llama", seed=0)
    first, later = greedy_rows(target, 3), greedy_rows(target, 4, seed=300)
    generator_side, training_side = _store(tmp_path, target), _store(tmp_path, target)
    features = []
    for row in first:
        with torch.no_grad():
            hidden = target(torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states
        features.append(context_features(hidden, [0, 1])[0])
    assert generator_side.put(first, features) == 3
    assert training_side.add(target, first + later, rows_per_shard=2) == 4  # sees the shard put since it opened
    assert generator_side.put(first, features) == 0
    assert len(_store(tmp_path, target)) == 7 and len(list((tmp_path / "features").glob("*.safetensors"))) == 3
    with pytest.raises(ValueError, match=r"keeps \(\d+, 64\) per row \(target layers \[0, 1\]\)"):
        generator_side.put(later[:1], [features[0][:, :32]])


@pytest.mark.parametrize("change", ["target", "layers", "max_length"])
def test_a_store_of_another_setting_is_refused(tmp_path, change):
    target = make_target("llama", seed=0)
    _store(tmp_path, target).add(target, greedy_rows(target, 2))
    other = dict(target=make_target("llama", seed=1) if change == "target" else target)
    other["layer_ids"] = (1,) if change == "layers" else (0, 1)
    other["max_length"] = 32 if change == "max_length" else 64
    with pytest.raises(ValueError, match="holds features of another setting"):
        _store(tmp_path, **other)


def test_a_store_that_does_not_fit_on_disk_is_refused(tmp_path, monkeypatch):
    target = make_target("llama", seed=0)
    store = _store(tmp_path, target)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ValueError, match="GiB free: free disk space, put the store elsewhere, or train without one"):
        store.add(target, greedy_rows(target, 2))


def test_training_from_the_store_is_training_from_the_target(tmp_path):
    """The same batch and anchors: the loss from stored features equals the loss from a target forward (bf16-close)."""
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 8)
    drafter = make_drafter(target, block_size=4, seed=3)
    store = _store(tmp_path, target, drafter.config.target_layer_ids)
    store.add(target, rows)
    dataset = ResponseDataset(rows, 64, store)
    batch = collate_right_padded([dataset[i] for i in range(8)])
    assert batch["features"].shape[:2] == batch["input_ids"].shape
    without = {k: v for k, v in batch.items() if k != "features"}
    with torch.no_grad():
        stored, _ = drafter_loss(drafter, target, batch, 4, 16, torch.Generator().manual_seed(0))
        computed, _ = drafter_loss(drafter, target, without, 4, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(stored, computed, rtol=2e-3, atol=2e-3)


def test_the_draft_vocabulary_loss_is_the_loss_over_its_rows(tmp_path):
    """A draft vocabulary that holds every token (in another order) gives the whole-vocabulary loss; a smaller one
    leaves out exactly the positions whose label it lacks, and counts them as misses."""
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 8)
    batch = collate_right_padded([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows])
    drafter = make_drafter(target, block_size=4, seed=3)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same anchors for every call
    with torch.no_grad():
        whole, whole_stats = drafter_loss(drafter, target, batch, 4, 16, generator())
        permuted = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
        every, every_stats = drafter_loss(drafter, target, batch, 4, 16, generator(), draft_token_ids=permuted)
    torch.testing.assert_close(every, whole)
    assert every_stats == whole_stats

    # By hand: the same anchors and drafter output, scored by the 10 most frequent labels' rows, over the positions
    # whose label is among them.
    anchors, valid = sample_anchor_positions(batch["loss_mask"], 16, generator())
    labels = block_labels(batch["input_ids"], anchors, 4, batch["loss_mask"]).masked_fill(~valid[:, :, None], -100)
    common = torch.bincount(labels[labels >= 0], minlength=VOCAB).argsort(descending=True)[:10]
    with torch.no_grad():
        subset, _ = drafter_loss(drafter, target, batch, 4, 16, generator(), draft_token_ids=common)
        hidden, _ = drafter_block_outputs(drafter, target, batch, anchors, 4)
    keep = torch.isin(labels, common)
    logits = hidden[keep] @ target.get_output_embeddings().weight[common].T
    targets = torch.tensor([common.tolist().index(int(t)) for t in labels[keep]])
    weights = block_loss_weights(4).expand_as(labels)[keep]
    expected = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()
    assert keep.sum() < (labels >= 0).sum()  # some labels really lie outside
    torch.testing.assert_close(subset, expected, rtol=1e-5, atol=1e-5)


def test_training_with_a_draft_vocabulary_and_a_store(tmp_path):
    """End to end: the drafter proposes its training data's most frequent tokens, learns from stored features,
    resumes from its checkpoint with the same store, and decodes losslessly."""
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 8)
    args = tiny_training_args(
        tmp_path / "drafter",
        draft_vocab_size=40,
        feature_store=str(tmp_path / "features"),
        max_steps=60,
        save_every_steps=30,
    )
    drafter = train_drafter(target, rows, args)
    assert drafter.config.draft_vocab_size == 40 and drafter.draft_token_ids.shape == (40,)
    assert VOCAB - 1 not in drafter.draft_token_ids.tolist()  # never the mask token
    history = json.loads((tmp_path / "drafter" / "training_log.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert len(FeatureStore(tmp_path / "features", target, drafter.config.target_layer_ids, args.max_length)) == 8
    ids = make_prompt(5, length=8)
    plain = target.generate(ids, do_sample=False, max_new_tokens=24)
    assert torch.equal(target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=24), plain)


@pytest.mark.parametrize("sliding", [False, True])
def test_block_sparse_attention_is_the_dense_masked_attention(sliding):
    """Training's attention without the scores between different blocks gives the dense masked forward's output and
    gradients, with padding, several blocks per row, grouped key heads and (for sliding layers) a window."""
    target = make_target("qwen3", seed=0)  # 4 query heads on 2 key heads
    extra = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3) if sliding else {}
    drafter = make_drafter(target, num_layers=2, block_size=4, seed=5, **extra).train()
    ids = torch.cat([make_prompt(1, length=14), make_prompt(2, length=14)])
    padding = torch.ones_like(ids)
    padding[1, 10:] = 0
    anchors = torch.tensor([[2, 5, 6, 11], [0, 3, 7, 8]])
    positions = torch.arange(14).expand(2, -1)
    with torch.no_grad():
        features = context_features(target(ids, output_hidden_states=True).hidden_states, drafter.config.target_layer_ids)
    outputs = {}
    for block_sparse in (False, True):
        layout = build_block_layout(
            torch.gather(ids, 1, anchors), anchors, 4, drafter.config.mask_token_id, positions, padding,
            sliding_window=3 if sliding else None, block_sparse=block_sparse,
        )
        drafter.zero_grad()
        hidden = drafter(
            noise_embeds=target.get_input_embeddings()(layout.input_ids),
            context_hidden_states=features,
            position_ids=torch.cat([positions, layout.position_ids], dim=1),
            attention_mask=layout.attention_mask,
        ).last_hidden_state
        hidden.square().sum().backward()
        outputs[block_sparse] = (hidden.detach(), [p.grad.clone() for p in drafter.parameters()])
    torch.testing.assert_close(outputs[True][0], outputs[False][0], rtol=1e-5, atol=1e-5)
    for sparse_grad, dense_grad in zip(outputs[True][1], outputs[False][1]):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-5)


def _head_problem(rows=11, hidden_size=6, vocabulary=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator)
    weight = torch.randn(vocabulary, hidden_size, generator=generator)
    bias = torch.randn(vocabulary, generator=generator)
    labels = torch.randint(vocabulary, (rows,), generator=generator)
    row_weights = torch.rand(rows, generator=generator)  # unequal, so a backward that ignores them fails
    return hidden, weight, bias, labels, row_weights


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_chunked_cross_entropy_is_the_cross_entropy_of_the_logits(soft, chunk_size):
    """Losses, argmax and the gradient of a weighted, normalised sum of the losses (what `drafter_loss` takes) equal
    those through the whole logits, for hard labels and for a distribution as the label, chunk boundaries anywhere."""
    hidden, weight, bias, labels, row_weights = _head_problem()
    soft_source = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)) if soft else None

    reference_hidden = hidden.clone().requires_grad_()
    logits = F.linear(reference_hidden, weight, bias)
    label_losses = F.cross_entropy(logits, labels, reduction="none")
    if soft:
        soft_labels = F.linear(soft_source, weight, bias).softmax(-1)
        expected = -(soft_labels * logits.log_softmax(-1)).sum(-1)
    else:
        expected = label_losses
    (expected * row_weights).sum().div(row_weights.sum()).backward()

    chunked_hidden = hidden.clone().requires_grad_()
    losses, chunked_label_losses, predictions = linear_cross_entropy(
        chunked_hidden, weight, bias, labels, soft_source, chunk_size=chunk_size
    )
    (losses * row_weights).sum().div(row_weights.sum()).backward()

    torch.testing.assert_close(losses, expected.detach())
    torch.testing.assert_close(chunked_label_losses, label_losses.detach())
    assert torch.equal(predictions, logits.argmax(-1))
    assert not chunked_label_losses.requires_grad and not predictions.requires_grad
    torch.testing.assert_close(chunked_hidden.grad, reference_hidden.grad)


def test_chunked_cross_entropy_under_bf16_autocast_is_the_autocast_loss():
    """Under bf16 autocast (what `train-drafter --dtype bf16` runs) the products are bf16 as they were over the
    whole logits: the same losses and nearly the same gradient (the per-row weight applied after the bf16 product)."""
    hidden, weight, bias, labels, row_weights = _head_problem(rows=40, hidden_size=32, vocabulary=50)
    gradients, losses = [], []
    for chunked in (False, True):
        leaf = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                row_losses = linear_cross_entropy(leaf, weight, None, labels, chunk_size=16)[0]
            else:
                row_losses = F.cross_entropy(F.linear(leaf, weight).float(), labels, reduction="none")
        (row_losses * row_weights).sum().backward()
        gradients.append(leaf.grad)
        losses.append(row_losses.detach())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(gradients[1], gradients[0], rtol=2e-2, atol=2e-2)
    assert not torch.equal(gradients[1], torch.zeros_like(gradients[1]))


def test_chunked_cross_entropy_refuses_a_head_that_learns():
    hidden, weight, bias, labels, _ = _head_problem()
    with pytest.raises(ValueError, match="freeze the head"):
        linear_cross_entropy(hidden, weight.requires_grad_(), bias, labels)
