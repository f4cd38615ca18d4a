"""One decode step's grouped attention on the real cache layout (keys and values the first slots of a longer static
cache), 128 rows, 9 query and 3 key/value heads of 64, bf16, one thread: as `grouped_attention` does it (keys copied,
`queries @ keys^T`) against scores as `keys @ queries^T` on the view itself (no copy; the softmax over the keys'
axis, the probabilities transposed for the values' product, as a view or copied). Medians of 7 alternated, ms a
layer.

Run (jemalloc preloaded): OMP_NUM_THREADS=1 python results/archive/probes/attention_scores_without_key_copy_cpu.py
"""

import json
import pathlib
import statistics
import time

import torch

torch.manual_seed(0)
BATCH, GROUPS, HEADS, HEAD_DIM, CAPACITY = 128, 3, 9, 64, 657
result = {}
for keys in (201, 450):
    key_cache = torch.randn(BATCH, GROUPS, CAPACITY, HEAD_DIM, dtype=torch.bfloat16)
    value_cache = torch.randn(BATCH, GROUPS, CAPACITY, HEAD_DIM, dtype=torch.bfloat16)
    key, value = key_cache[:, :, :keys], value_cache[:, :, :keys]
    query = torch.randn(BATCH, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16).transpose(1, 2)
    mask = torch.zeros(BATCH, 1, 1, keys, dtype=torch.bfloat16)
    grouped_query = query.reshape(BATCH, GROUPS, HEADS // GROUPS, HEAD_DIM)

    def keys_copied():
        scores = torch.matmul(grouped_query, key.contiguous().transpose(-1, -2)).view(BATCH, HEADS, 1, -1)
        probs = torch.softmax(scores.float() * 0.125 + mask, -1).to(value.dtype)
        return torch.matmul(probs.view(BATCH, GROUPS, HEADS // GROUPS, -1), value).view(BATCH, HEADS, 1, HEAD_DIM)

    def transposed_scores(copy_probs):
        scores = torch.matmul(key, grouped_query.transpose(-1, -2)).float() * 0.125  # (rows, groups, keys, heads)
        probs = torch.softmax(scores + mask.transpose(-1, -2), -2).to(value.dtype).transpose(-1, -2)
        return torch.matmul(probs.contiguous() if copy_probs else probs, value).reshape(BATCH, HEADS, 1, HEAD_DIM)

    variants = {
        "keys_copied": keys_copied,
        "transposed_scores": lambda: transposed_scores(False),
        "transposed_scores_probs_copied": lambda: transposed_scores(True),
    }
    expected = keys_copied().float()
    for run in variants.values():
        torch.testing.assert_close(run().float(), expected, atol=2e-2, rtol=2e-2)
    times = {name: [] for name in variants}
    for _ in range(7):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    result[keys] = {name: round(statistics.median(t), 2) for name, t in times.items()}
    print(keys, result[keys], flush=True)
pathlib.Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))
