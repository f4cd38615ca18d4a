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
