"""The chunked loss (`linear_cross_entropy`) against the loss over the whole logits: time and peak memory of drafter
training steps as `train-drafter --dtype bf16` runs them (frozen target, stored features, 16K draft vocabulary,
block-sparse attention, bf16 autocast, batch 16, blocks of 16 and 4 alternately).

  time:   .venv/bin/python results/current/training_cost/chunked_loss.py DATA STORE_DIR time [ROUNDS]
          (both variants on the same 3 batches, alternating, ROUNDS rounds (3), the first one left out)
  memory: .venv/bin/python results/current/training_cost/chunked_loss.py DATA STORE_DIR memory whole|chunked
          (one variant per process: the growth of its peak resident memory over 3 steps)

STORE_DIR keeps the 48 rows' target features between runs.
"""

import resource
import sys
import time

import torch

import blockpilot_hf.training.drafter as training
from blockpilot_hf.loading import load_target
from blockpilot_hf.modeling_drafter import DFlashDrafter, choose_mask_token_id
from blockpilot_hf.training.data import frequent_token_ids, read_responses
from blockpilot_hf.training.drafter import ResponseDataset, collate_right_padded, drafter_loss
from blockpilot_hf.training.feature_store import FeatureStore
from whole_logits import whole_logits_loss


data, store_dir, mode = sys.argv[1:4]
torch.manual_seed(0)
target, tokenizer = load_target("default", torch.float32)
target.requires_grad_(False)
rows = ResponseDataset(read_responses(data), 768).rows
sample, vocabulary_rows = rows[:48], rows[48:3000]
drafter = DFlashDrafter.from_target(target, num_layers=2, block_size=16, mask_token_id=choose_mask_token_id(tokenizer))
drafter.float().train()
vocabulary = torch.tensor(frequent_token_ids(vocabulary_rows, 16384, exclude={drafter.config.mask_token_id}))
store = FeatureStore(store_dir, target, drafter.config.target_layer_ids, 768)
store.add(target, sample)
dataset = ResponseDataset(sample, 768, store)
variants = {"whole": whole_logits_loss, "chunked": training.linear_cross_entropy}


def step(batch_index: int) -> tuple[float, float]:
    batch = collate_right_padded([dataset[i] for i in range(16 * batch_index, 16 * batch_index + 16)])
    block_size = 16 if batch_index % 2 == 0 else 4
    begin = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = drafter_loss(
            drafter, target, batch, block_size, 1024 // block_size, torch.Generator().manual_seed(batch_index),
            draft_token_ids=vocabulary,
        )
    loss.backward()
    drafter.zero_grad(set_to_none=True)
    return time.perf_counter() - begin, loss.item()


if mode == "memory":
    training.linear_cross_entropy = variants[sys.argv[4]]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for b in range(3):
        step(b)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(f"{sys.argv[4]}: peak resident memory grew by {growth} MB over 3 steps")
else:
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    totals = dict.fromkeys(variants, 0.0)
    for round_index in range(rounds):
        for name, loss_function in variants.items():
            training.linear_cross_entropy = loss_function
            for b in range(3):
                seconds, loss = step(b)
                print(f"round {round_index} {name:8s} batch {b}: {seconds:6.2f} s, loss {loss:.4f}", flush=True)
                totals[name] += seconds if round_index > 0 else 0.0
    ratio = totals["whole"] / totals["chunked"]
    print({name: round(total, 2) for name, total in totals.items()}, f"whole / chunked: {ratio:.3f}")
