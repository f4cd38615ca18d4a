"""The training recipe learns what can be learned: a check that fails when training, layout or decoding disagree.

A tiny target is first trained to continue arithmetic progressions modulo 32 (`a, a+s, a+2s, ...`, step s in 1..3),
so its greedy continuation of a prompt is fully predictable, yet only from the context: the anchor token alone does
not tell the step. The real drafter training (`train_drafter`, on the target's own greedy responses) must then bring
the acceptance of the real decoding loop on unseen prompts to at least 0.8 x B (it measured 7.34 at B = 8). Public
DFlash ports had mask, tied-head and off-by-one bugs that capped tau near 1.3 on real data. Broken on purpose in
`layout.py` (in a prototype of this check, whose target trained on other seeds), labels shifted by one position gave
tau 1.00, and a training mask that lets blocks see the 3 context positions after their anchor gave 6.0 (7.05 unbroken):
both fail the check.
"""

import pytest
import torch

import blockpilot_hf
from blockpilot_hf.training.drafter import DrafterTrainingArguments, train_drafter
from helpers.models import make_target

pytestmark = pytest.mark.long

VOCAB, MASK = 32, 32  # the mask token is one more id the target never produces
BLOCK = 8


def progressions(count: int, length: int, seed: int) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def progression_target(steps: int = 150):
    """A tiny Llama trained until its greedy continuation of a progression is the progression."""
    target = make_target("llama", seed=0, vocab_size=VOCAB + 1, hidden_size=64, num_layers=2, enable=False)
    optimizer = torch.optim.AdamW(target.parameters(), lr=1e-2)
    for step in range(steps):
        sequences = progressions(64, 48, seed=step)
        target(sequences, labels=sequences).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return blockpilot_hf.enable(target.eval())


def test_training_reaches_most_of_the_block_where_the_target_is_predictable(tmp_path):
    target = progression_target()
    prompts = progressions(96, 6, seed=10_000)
    with torch.no_grad():
        responses = target.generate(prompts, do_sample=False, max_new_tokens=40)
    assert torch.equal(responses, progressions(96, 46, seed=10_000))  # the target learned its task

    rows = [
        {"prompt_id": f"p{i}", "mode": "greedy", "prompt_len": 6, "input_ids": row}
        for i, row in enumerate(responses[:64].tolist())
    ]
    args = DrafterTrainingArguments(
        output_dir=str(tmp_path),
        block_size=BLOCK,
        num_layers=2,
        max_anchors=16,
        batch_size=16,
        epochs=10_000,
        max_steps=300,
        learning_rate=5e-3,
        warmup_ratio=0.05,
        save_every_steps=10**6,
        mask_token_id=MASK,
    )
    drafter = train_drafter(target, rows, args)

    held_out = responses[64:]  # prompts the drafter never saw
    out = target.generate(
        held_out[:, :6],
        assistant_model=drafter,
        block_policy=BLOCK,
        do_sample=False,
        max_new_tokens=40,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, held_out)
    steps = [length for row in out.acceptance_lengths for length in row]
    tau = sum(steps) / len(steps)
    assert tau >= 0.8 * BLOCK, f"tau {tau:.2f} at B = {BLOCK}: the recipe does not learn a learnable continuation"
