"""The recipe choices the ablations compare (issue 16, item 4): D-PACE confidence weighting of block positions, soft
targets (the target's distribution) and draft layers started from the target's, next to DFlash's decay weighting,
hard labels and a random start."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.models import VOCAB, make_drafter, make_target
from helpers.training import drafter_block_outputs, greedy_rows, tiny_training_args

from blockpilot_hf.layout import IGNORE_INDEX, block_labels, block_loss_weights
from blockpilot_hf.training.drafter import (
    DrafterTrainingArguments,
    ResponseDataset,
    collate_right_padded,
    confidence_weights,
    drafter_loss,
    sample_anchor_positions,
    train_drafter,
)
from blockpilot_hf.training.feature_store import FeatureStore


def test_confidence_weights_by_hand():
    # One block of 5: the anchor, then confidences 0.5, 0.8, 1.0, 0.2 smoothed with alpha 0.5 to 0.75, 0.9, 1, 0.6.
    confidence = torch.tensor([[0.0, 0.5, 0.8, 1.0, 0.2]])
    valid = torch.tensor([[False, True, True, True, True]])
    reach = [0.75, 0.75 * 0.9, 0.75 * 0.9, 0.75 * 0.9 * 0.6]  # chance of reaching positions 1..4
    expected = [0.0] + [sum(reach[k:]) for k in range(4)]
    torch.testing.assert_close(confidence_weights(confidence, valid, 0.5)[0], torch.tensor(expected))
    # The sequence ends after position 2: positions 3 and 4 weigh nothing and add nothing to earlier positions.
    ended = torch.tensor([[False, True, True, False, False]])
    torch.testing.assert_close(
        confidence_weights(confidence, ended, 0.5)[0], torch.tensor([0.0, 0.75 + 0.675, 0.675, 0.0, 0.0])
    )
    # alpha = 1 ignores the drafter: every valid position weighs how many positions remain from it.
    torch.testing.assert_close(confidence_weights(confidence, valid, 1.0)[0], torch.tensor([0.0, 4, 3, 2, 1]))


def test_the_confidence_weighted_loss_by_hand(tmp_path):
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 6)
    batch = collate_right_padded([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows])
    # A briefly trained drafter: its confidence differs between blocks and positions, so the weighting matters.
    drafter = train_drafter(target, rows, tiny_training_args(tmp_path, max_steps=200))
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same anchors for every call
    with torch.no_grad():
        loss, _ = drafter_loss(drafter, target, batch, 4, 8, generator(), loss_weighting="confidence")
        decay, _ = drafter_loss(drafter, target, batch, 4, 8, generator())
        anchors, anchor_valid = sample_anchor_positions(batch["loss_mask"], 8, generator())
        labels = block_labels(batch["input_ids"], anchors, 4, batch["loss_mask"])
        labels = labels.masked_fill(~anchor_valid[:, :, None], IGNORE_INDEX)
        hidden, _ = drafter_block_outputs(drafter, target, batch, anchors, 4)
    # Position by position, block by block, in plain Python.
    numerator = denominator = 0.0
    reach_only = [0.0, 0.0]  # the same without the suffix sums: a wrong weighting the data must tell apart
    for row in range(labels.shape[0]):
        for block in range(labels.shape[1]):
            ces = {}
            for k in range(1, 4):
                if labels[row, block, k] != IGNORE_INDEX:
                    logits = target.get_output_embeddings()(hidden[row, block, k])
                    ces[k] = F.cross_entropy(logits[None], labels[row, block, k][None]).item()
            reach, reaches = 1.0, {}
            for k in sorted(ces):
                reach *= 0.5 * torch.exp(torch.tensor(-ces[k])).item() + 0.5
                reaches[k] = reach
            for k, ce in ces.items():
                weight = sum(r for m, r in reaches.items() if m >= k)
                numerator += weight * ce
                denominator += weight
                reach_only[0] += reaches[k] * ce
                reach_only[1] += reaches[k]
    assert denominator > 0
    torch.testing.assert_close(loss, torch.tensor(numerator / denominator), rtol=1e-5, atol=1e-6)
    assert abs(numerator / denominator - reach_only[0] / reach_only[1]) > 1e-3
    assert abs(loss.item() - decay.item()) > 1e-4


def test_the_soft_target_loss_by_hand(tmp_path):
    target = make_target("llama", seed=0, logit_scale=4.0)
    rows = greedy_rows(target, 6)
    batch = collate_right_padded([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows])
    # A briefly trained drafter, whose predictions follow the target's: a target distribution one position off
    # would then change the loss.
    drafter = train_drafter(target, rows, tiny_training_args(tmp_path, max_steps=200))
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same anchors for every call
    with torch.no_grad():
        soft, _ = drafter_loss(drafter, target, batch, 4, 8, generator(), soft_targets=True)
        hard, _ = drafter_loss(drafter, target, batch, 4, 8, generator())
        anchors, anchor_valid = sample_anchor_positions(batch["loss_mask"], 8, generator())
        labels = block_labels(batch["input_ids"], anchors, 4, batch["loss_mask"])
        labels = labels.masked_fill(~anchor_valid[:, :, None], IGNORE_INDEX)
        hidden, target_logits = drafter_block_outputs(drafter, target, batch, anchors, 4)
    weights = block_loss_weights(4)
    numerator = denominator = 0.0
    for row, block, k in (labels != IGNORE_INDEX).nonzero().tolist():
        # The target's own next-token distribution at the position before the label (its full-model logits).
        wanted = torch.softmax(target_logits[row, anchors[row, block] + k - 1], -1)
        drafted = torch.log_softmax(target.get_output_embeddings()(hidden[row, block, k]), -1)
        numerator += weights[k] * -(wanted * drafted).sum()
        denominator += weights[k]
    torch.testing.assert_close(soft, numerator / denominator, rtol=1e-5, atol=1e-6)
    assert abs(soft.item() - hard.item()) > 0.05


def test_soft_targets_from_a_store_that_keeps_the_final_hidden_state(tmp_path):
    target = make_target("llama", seed=0, logit_scale=4.0)
    rows = greedy_rows(target, 8)
    drafter = make_drafter(target, block_size=4, seed=3)
    layer_ids = drafter.config.target_layer_ids
    store = FeatureStore(tmp_path / "soft", target, layer_ids, 64, with_final_hidden_state=True)
    store.add(target, rows)
    dataset = ResponseDataset(rows, 64, store)
    batch = collate_right_padded([dataset[i] for i in range(8)])
    without = {k: v for k, v in batch.items() if k != "features"}
    with torch.no_grad():
        stored, _ = drafter_loss(drafter, target, batch, 4, 16, torch.Generator().manual_seed(0), soft_targets=True)
        computed, _ = drafter_loss(
            drafter, target, without, 4, 16, torch.Generator().manual_seed(0), soft_targets=True
        )
    torch.testing.assert_close(stored, computed, rtol=2e-3, atol=2e-3)
    # A store of context features only cannot give soft targets: refused, naming the fix.
    plain = FeatureStore(tmp_path / "plain", target, layer_ids, 64)
    plain.add(target, rows)
    batch = collate_right_padded([ResponseDataset(rows, 64, plain)[i] for i in range(8)])
    with pytest.raises(ValueError, match="with_final_hidden_state=True"):
        drafter_loss(drafter, target, batch, 4, 16, torch.Generator().manual_seed(0), soft_targets=True)
    with pytest.raises(ValueError, match="another setting"):
        FeatureStore(tmp_path / "plain", target, layer_ids, 64, with_final_hidden_state=True)


def test_draft_layers_start_from_the_targets():
    target = make_target("llama", seed=0, num_layers=3)
    drafter = make_drafter(target, num_layers=2)
    drafter.copy_target_layers(target, [2, 0])
    for draft_layer, index in zip(drafter.layers, [2, 0]):
        source = dict(target.model.layers[index].named_parameters())
        names = [name for name, _ in draft_layer.named_parameters() if name in source]
        assert {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"} <= set(names)
        for name, param in draft_layer.named_parameters():
            if name in source:
                torch.testing.assert_close(param, source[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one each"):
        drafter.copy_target_layers(target, [1])
    with pytest.raises(ValueError, match="does not exist"):
        drafter.copy_target_layers(target, [1, 3])


def test_training_with_every_option_at_once(tmp_path):
    target = make_target("llama", seed=0, num_layers=2)
    rows = greedy_rows(target, 8)
    args = tiny_training_args(
        tmp_path,
        max_steps=3,
        loss_weighting="confidence",
        soft_targets=True,
        init_layers_from_target=[1],
        log_every_steps=1,
        feature_store=str(tmp_path / "store"),
    )
    drafter = train_drafter(target, rows, args)
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["args"]["loss_weighting"] == "confidence" and log["args"]["init_layers_from_target"] == [1]
    assert (
        log["args"]["soft_targets"]
        and json.loads((tmp_path / "store" / "store.json").read_text())["final_hidden_state"]
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log["history"])
    # Three steps of training moved the copied layer away from the target's, but not by much.
    moved = drafter.layers[0].mlp.down_proj.weight - target.model.layers[1].mlp.down_proj.weight
    assert 0 < moved.abs().max() < 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"loss_weighting": "soft"}, "one of decay, confidence"),
        ({"confidence_alpha": 0.0}, r"\(0, 1\]"),
        ({"init_layers_from_target": [1, 2]}, "one per draft layer"),
    ],
)
def test_bad_recipe_options_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        DrafterTrainingArguments(output_dir=str(tmp_path), num_layers=1, mask_token_id=VOCAB - 1, **bad)
