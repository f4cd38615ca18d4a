"""The block layout (`layout.py`): where a block's anchor and mask tokens sit, which keys each block query sees in a
training forward, the per-position labels and loss weights, and that many blocks in one masked forward equal one
decoding forward per block."""

import pytest
import torch

from blockpilot_hf.layout import IGNORE_INDEX, block_labels, block_loss_weights, build_block_layout


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


def test_training_layout_matches_decoding_forward(qwen3_drafter):
    """Many blocks in one masked forward (training) give what one decoding forward per block gives."""
    drafter = qwen3_drafter
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
