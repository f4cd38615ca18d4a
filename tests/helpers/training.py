"""Drafter-training data made by a tiny target itself, and training arguments that learn something in well under a
second."""

import torch

from helpers.models import VOCAB, greedy_reference, make_prompt


def greedy_rows(target, num_prompts: int, prompt_len: int = 6, max_new_tokens: int = 32, seed: int = 100) -> list[dict]:
    """Rows in the `regenerate_responses` format made by `target` itself (greedy, EOS ignored)."""
    vocab = target.get_input_embeddings().weight.shape[0]
    prompts = torch.cat([make_prompt(seed + i, length=prompt_len, vocab_size=vocab) for i in range(num_prompts)])
    out = greedy_reference(target, prompts, max_new_tokens)
    return [
        {"prompt_id": f"p{i}", "mode": "greedy", "prompt_len": prompt_len, "input_ids": row}
        for i, row in enumerate(out.tolist())
    ]


def tiny_training_args(output_dir, **overrides):
    """Drafter training arguments that learn something on a VOCAB-96 target in well under a second."""
    from blockpilot_hf.training.drafter import DrafterTrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), block_size=4, num_layers=1, max_anchors=16, batch_size=8, epochs=1000,
        max_steps=100, learning_rate=3e-2, warmup_ratio=0.1, log_every_steps=5, save_every_steps=10_000,
        mask_token_id=VOCAB - 1,
    )
    kwargs.update(overrides)
    return DrafterTrainingArguments(**kwargs)


def drafter_block_outputs(drafter, target, batch: dict, anchors: torch.LongTensor, block_size: int):
    """The drafter's output at every position of the blocks anchored at `anchors` (`(batch, anchors, block, hidden)`)
    and the target's logits over the batch, computed outside `drafter_loss`: a plain target forward, the shared block
    layout, one drafter forward."""
    from blockpilot_hf.features import context_features
    from blockpilot_hf.layout import build_block_layout

    input_ids = batch["input_ids"]
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
    layout = build_block_layout(
        torch.gather(input_ids, 1, anchors), anchors, block_size, drafter.config.mask_token_id, positions,
        batch["attention_mask"],
    )
    out = target(input_ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = drafter(
        noise_embeds=target.get_input_embeddings()(layout.input_ids),
        context_hidden_states=context_features(out.hidden_states, drafter.config.target_layer_ids),
        position_ids=torch.cat([positions, layout.position_ids], 1),
        attention_mask=layout.attention_mask,
    ).last_hidden_state
    return hidden.view(*anchors.shape, block_size, -1), out.logits
