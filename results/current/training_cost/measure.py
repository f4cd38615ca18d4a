"""Drafter training cost on this machine: sequences per hour of one training step (forward + backward), before and
after the draft-vocabulary loss, the feature store, block-sparse attention and the chunked loss
(`linear_cross_entropy`: no logits kept), in fp32 and under bf16 autocast (what `train-drafter --dtype bf16` runs:
accelerate's bf16 mixed precision), on real rows of the drafter-at-scale data. The target is frozen, as in training.

Run: .venv/bin/python results/current/training_cost/measure.py DATA_DIR OUT_JSON [WORD]
(2 layers, block 16, 64 anchors, batch 8, the same 3 batches for every setting, the faster of 2 rounds; with WORD only
the settings whose name holds it, e.g. "autocast".)
"""

import json
import sys
import tempfile
import time

import torch

import blockpilot_hf.training.drafter as training
from blockpilot_hf.loading import load_target
from blockpilot_hf.modeling_drafter import DFlashDrafter, choose_mask_token_id
from blockpilot_hf.training.data import frequent_token_ids, read_responses
from blockpilot_hf.training.drafter import ResponseDataset, collate_right_padded, drafter_loss
from blockpilot_hf.training.feature_store import FeatureStore
from whole_logits import whole_logits_loss

data, out = sys.argv[1], sys.argv[2]
only = sys.argv[3] if len(sys.argv) > 3 else ""
torch.manual_seed(0)
target, tokenizer = load_target("default", torch.float32)
target.requires_grad_(False)  # as train_drafter freezes it: no gradient for the LM head or the embedding
rows = ResponseDataset(read_responses(data), 768).rows
sample, vocabulary_rows = rows[:24], rows[24:]
drafter = DFlashDrafter.from_target(target, num_layers=2, block_size=16, mask_token_id=choose_mask_token_id(tokenizer))
drafter.float().train()
vocabulary = torch.tensor(frequent_token_ids(vocabulary_rows, 16384, exclude={drafter.config.mask_token_id}))

store_dir = tempfile.mkdtemp()
store = FeatureStore(store_dir, target, drafter.config.target_layer_ids, 768)
start = time.perf_counter()
store.add(target, sample)
build_s = time.perf_counter() - start
tokens = sum(min(len(r["input_ids"]), 768) for r in sample)

plain = ResponseDataset(sample, 768)
stored = ResponseDataset(sample, 768, store)
settings = {  # name: (rows, draft vocabulary, block-sparse attention, bf16 autocast, chunked loss)
    "target forward, whole vocabulary, dense attention (before)": (plain, None, False, False, False),
    "target forward, draft vocabulary 16384, dense attention": (plain, vocabulary, False, False, False),
    "stored features, whole vocabulary, dense attention": (stored, None, False, False, False),
    "stored features, draft vocabulary 16384, dense attention": (stored, vocabulary, False, False, False),
    "stored features, draft vocabulary 16384, block-sparse attention (fp32)": (stored, vocabulary, True, False, False),
    "target forward, whole vocabulary, dense attention, bf16 autocast": (plain, None, False, True, False),
    "stored features, draft vocabulary 16384, block-sparse attention, bf16 autocast": (
        stored, vocabulary, True, True, False
    ),
    "stored features, draft vocabulary 16384, block-sparse attention, bf16 autocast, chunked loss (after)": (
        stored, vocabulary, True, True, True
    ),
}


build_block_layout, chunked_loss = training.build_block_layout, training.linear_cross_entropy
results = {"rows": len(sample), "tokens": tokens, "feature_build_s": build_s, "settings": {}}
for name, (dataset, token_ids, block_sparse, bf16, chunked) in settings.items():
    if only not in name:
        continue
    training.linear_cross_entropy = chunked_loss if chunked else whole_logits_loss
    training.build_block_layout = lambda *a, **k: build_block_layout(*a, **{**k, "block_sparse": block_sparse})
    times = []
    for _ in range(2):
        for b in range(3):
            batch = collate_right_padded([dataset[i] for i in range(8 * b, 8 * b + 8)])
            begin = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = drafter_loss(
                    drafter, target, batch, 16, 64, torch.Generator().manual_seed(b), draft_token_ids=token_ids
                )
            loss.backward()
            drafter.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - begin)
    per_round = [sum(times[i : i + 3]) for i in (0, 3)]
    seconds = min(per_round)  # 24 sequences
    results["settings"][name] = {"seconds_per_24_sequences": seconds, "sequences_per_hour": 24 * 3600 / seconds}
    print(f"{name:72s} {seconds:6.1f} s / 24 sequences -> {24 * 3600 / seconds:7.0f} sequences/h", flush=True)
print(f"feature store: {build_s:.1f} s for {len(sample)} rows ({tokens / build_s:.0f} tokens/s), once")
with open(out, "w") as f:
    json.dump(results, f, indent=1)
