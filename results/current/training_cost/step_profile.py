"""Where a drafter training step's time goes, and what `torch.compile` saves of it: steps as `train-drafter --dtype
bf16` runs them (frozen bf16 target, stored features, 16K draft vocabulary, block-sparse attention, bf16 autocast,
confidence weighting, batch 16, blocks of 16 and 4 alternately, AdamW).

  ops:     .venv/bin/python results/current/training_cost/step_profile.py DATA STORE_DIR ops
           (torch.profiler over 2 steps after 2 warm-up steps: self time per op, and per op and shape)
  compile: .venv/bin/python results/current/training_cost/step_profile.py DATA STORE_DIR compile [ROUNDS]
           (eager and `torch.compile(dynamic=True)` on the same 4 batches, alternating, ROUNDS rounds (3); the first
           round, the compiler's warm-up, is reported apart)

STORE_DIR: a feature store of target layers 1 and 27 holding the data's first rows (the study's store does).
Run it with examples/jemalloc.sh sourced, as the training scripts do.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from blockpilot_hf.loading import load_target
from blockpilot_hf.modeling_drafter import DFlashDrafter, choose_mask_token_id
from blockpilot_hf.training.data import frequent_token_ids, read_responses
from blockpilot_hf.training.drafter import ResponseDataset, collate_right_padded, drafter_loss
from blockpilot_hf.training.feature_store import FeatureStore


data, store_dir, mode = sys.argv[1:4]
torch.manual_seed(0)
target, tokenizer = load_target("default", torch.bfloat16)  # as train-drafter --dtype bf16 loads it
target.requires_grad_(False)
rows = ResponseDataset(read_responses(data), 768).rows
drafter = DFlashDrafter.from_target(
    target, num_layers=2, block_size=16, mask_token_id=choose_mask_token_id(tokenizer), target_layer_ids=[1, 27]
)
drafter.float().train()
drafter.set_draft_vocabulary(frequent_token_ids(rows[:3000], 16384, exclude={drafter.config.mask_token_id}))
store = FeatureStore(store_dir, target, [1, 27], 768)
store.add(target, rows[:64])
dataset = ResponseDataset(rows[:64], 768, store)
optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-5)


def step(batch_index: int, model) -> float:
    batch = collate_right_padded([dataset[i] for i in range(16 * (batch_index % 4), 16 * (batch_index % 4) + 16)])
    block_size = 16 if batch_index % 2 == 0 else 4
    begin = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = drafter_loss(
            model, target, batch, block_size, 1024 // block_size, torch.Generator().manual_seed(batch_index),
            config=drafter.config, draft_token_ids=drafter.draft_token_ids, loss_weighting="confidence",
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - begin


if mode == "ops":
    for b in range(2):
        step(b, drafter)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        seconds = [step(b, drafter) for b in range(2, 4)]
    print(f"2 profiled steps: {sum(seconds):.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))
else:
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    variants = {"eager": drafter, "compiled": torch.compile(drafter, dynamic=True)}
    totals = dict.fromkeys(variants, 0.0)
    for round_index in range(rounds):
        for name, model in variants.items():
            seconds = [step(b, model) for b in range(4)]
            print(f"round {round_index} {name:8s}: " + " ".join(f"{s:6.2f}" for s in seconds) + " s", flush=True)
            totals[name] += sum(seconds) if round_index > 0 else 0.0
    steps = 4 * (rounds - 1)
    print(
        {name: round(total / steps, 3) for name, total in totals.items()},
        f"s a step; eager / compiled: {totals['eager'] / totals['compiled']:.3f}",
    )
