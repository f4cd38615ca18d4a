"""Drafter training steps and bulk decoding under glibc's allocator and under jemalloc that keeps freed memory (no
decay), on this VM, where memory a process gives back costs a page fault per 4 KB page when it is taken again.

Each allocator runs in fresh processes: 8 training steps of the study's recipe (2 layers, batch 16 real rows of the
drafter data with their stored features, 64 anchors of 16 tokens, 16K draft vocabulary, block-sparse attention,
AdamW), wall and system seconds per step and minor page faults; then three real batches of bulk decoding as
`regenerate` forms them (32 prompts x greedy + one sample, 128 new tokens), seconds and system seconds per batch.
Run with the cores otherwise idle:
  python results/current/allocator/measure.py FEATURE_STORE DATA_DIR [OUT.json]
"""

import json
import os
import resource
import subprocess
import sys
import time

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
ALLOCATORS = {
    "glibc": {},
    "jemalloc, no decay": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}


def steps(store_dir: str, data_dir: str, count: int = 8) -> list[dict]:
    import torch

    from blockpilot_hf.loading import load_target
    from blockpilot_hf.modeling_drafter import DFlashDrafter
    from blockpilot_hf.training.data import frequent_token_ids, read_responses
    from blockpilot_hf.training.drafter import ResponseDataset, collate_right_padded, drafter_loss
    from blockpilot_hf.training.feature_store import FeatureStore, row_key

    torch.manual_seed(0)
    target, _ = load_target("default", torch.float32)
    store = FeatureStore(store_dir, target, [1, 27], 768)
    rows = [r for r in ResponseDataset(read_responses(data_dir), 768).rows if row_key(r["input_ids"][:768]) in store]
    dataset = ResponseDataset(rows[: 16 * count], 768, store)
    drafter = DFlashDrafter.from_target(
        target, num_layers=2, block_size=16, mask_token_id=16, target_layer_ids=[1, 27]
    )
    drafter.float().train()
    drafter.set_draft_vocabulary(frequent_token_ids(rows, 16384, exclude={16}))
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=6e-4)
    records = []
    for step in range(count):
        batch = collate_right_padded([dataset[i] for i in range(16 * step, 16 * step + 16)])
        block_size = (4, 16)[step % 2]
        before, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        loss, _ = drafter_loss(
            drafter, target, batch, block_size, 64 * 16 // block_size, torch.Generator().manual_seed(step)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after = resource.getrusage(resource.RUSAGE_SELF)
        records.append(
            {
                "block_size": block_size,
                "wall_s": round(time.perf_counter() - before, 2),
                "system_s": round(after.ru_stime - usage.ru_stime, 2),
                "minor_faults": after.ru_minflt - usage.ru_minflt,
            }
        )
        print(records[-1], flush=True)
    return records


def decoding_batches(data_dir: str, count: int = 3, prompts_per_batch: int = 32) -> list[dict]:
    import torch

    from blockpilot_hf.loading import load_target
    from blockpilot_hf.training.bulk_decoding import decode_batch
    from blockpilot_hf.training.data import read_responses

    target, _ = load_target("default", torch.float32)
    responses = read_responses(data_dir)
    sampled = {r["prompt_id"]: r["temperature"] for r in responses if r["mode"] != "greedy"}
    greedy = [r for r in responses if r["mode"] == "greedy" and r["prompt_id"] in sampled]
    greedy.sort(key=lambda r: r["prompt_len"])
    records = []
    for b in range(count):
        at = len(greedy) // 2 + b * prompts_per_batch  # median prompt lengths
        rows = greedy[at : at + prompts_per_batch]
        prompts = [r["input_ids"][: r["prompt_len"]] for r in rows for _ in range(2)]
        temperatures = [t for r in rows for t in (None, sampled[r["prompt_id"]])]
        before, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out = decode_batch(target, prompts, 2, {2}, 128, temperatures, torch.Generator().manual_seed(b))
        after = resource.getrusage(resource.RUSAGE_SELF)
        seconds = time.perf_counter() - before
        records.append(
            {
                "wall_s": round(seconds, 2),
                "system_s": round(after.ru_stime - usage.ru_stime, 2),
                "minor_faults": after.ru_minflt - usage.ru_minflt,
                "response_tokens_per_s": round(sum(map(len, out)) / seconds, 1),
            }
        )
        print(records[-1], flush=True)
    return records


def child(env: dict, mode: str, *args) -> list[dict]:
    """The records of one measurement, run in a fresh process under `env`'s allocator."""
    command = [sys.executable, __file__, mode, *args]
    output = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def mean(records: list[dict], key: str) -> float:
    return round(sum(r[key] for r in records) / len(records), 2)


def main(store_dir: str, data_dir: str, out: str | None = None):
    results = {}
    for name, env in ALLOCATORS.items():
        training = child(env, "--training", store_dir, data_dir)
        decoding = child(env, "--decoding", data_dir)
        later = training[2:]  # the first two steps allocate the process's working set either way
        results[name] = {
            "training_steps": training,
            "training_mean_wall_s_after_2": mean(later, "wall_s"),
            "training_mean_system_s_after_2": mean(later, "system_s"),
            "decoding_batches": decoding,
            "decoding_mean_tokens_per_s_after_1": mean(decoding[1:], "response_tokens_per_s"),
        }
        print(name, {k: v for k, v in results[name].items() if "mean" in k}, flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--training":
        print(json.dumps(steps(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "--decoding":
        print(json.dumps(decoding_batches(sys.argv[2])))
    else:
        main(*sys.argv[1:])
