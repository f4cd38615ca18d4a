"""What keeping the decoder's features costs, against the target pass a feature store otherwise makes over the same
rows: one real batch of the scale data (32 median-length prompts x (greedy, sampled), as `regenerate` forms it),
decoded without and with `feature_layer_ids` (layers 1 and 27, the study's), then `FeatureStore.add` over the rows
it made (the pass the kept features replace) and `FeatureStore.put` of the kept ones.
Usage: python results/current/drafter_data/feature_capture.py DATA_DIR [OUT.json] [MAX_NEW_TOKENS]
"""

import json
import sys
import tempfile
import time

import torch

from blockpilot_hf.decoding.requests import eos_token_ids
from blockpilot_hf.loading import load_target
from blockpilot_hf.training.bulk_decoding import decode_batch
from blockpilot_hf.training.data import read_responses
from blockpilot_hf.training.feature_store import FeatureStore

LAYERS = [1, 27]


def main(data_dir: str, out: str | None = None, max_new_tokens: str = "256", prompts_per_batch: int = 32):
    target, _ = load_target("default", torch.float32)
    eos = eos_token_ids(target.generation_config)
    data = read_responses(data_dir)
    sampled = {r["prompt_id"]: r["temperature"] for r in data if r["mode"] != "greedy"}
    greedy = sorted(
        (r for r in data if r["mode"] == "greedy" and r["prompt_id"] in sampled),
        key=lambda r: r["prompt_len"],
    )
    rows = greedy[len(greedy) // 2 : len(greedy) // 2 + prompts_per_batch]
    prompts = [r["input_ids"][: r["prompt_len"]] for r in rows for _ in range(2)]
    temperatures = [t for r in rows for t in (None, sampled[r["prompt_id"]])]
    results = {"rows": len(prompts), "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": int(max_new_tokens)}

    def decode(**kwargs):
        start = time.perf_counter()
        decoded = decode_batch(
            target, prompts, 2, eos, int(max_new_tokens), temperatures, torch.Generator().manual_seed(0), **kwargs
        )
        return time.perf_counter() - start, decoded

    seconds, plain = decode()
    results["decode s, plain"] = round(seconds, 2)
    seconds, (responses, features) = decode(feature_layer_ids=LAYERS)
    results["decode s, keeping features"] = round(seconds, 2)
    assert responses == plain
    made = [{"input_ids": p + r, "prompt_len": len(p)} for p, r in zip(prompts, responses)]
    results["response tokens"] = sum(map(len, responses))
    with tempfile.TemporaryDirectory() as store_dir:
        store = FeatureStore(f"{store_dir}/computed", target, LAYERS, 768)
        start = time.perf_counter()
        store.add(target, made)
        results["store fill s (the target pass it replaces)"] = round(time.perf_counter() - start, 2)
        kept = FeatureStore(f"{store_dir}/kept", target, LAYERS, 768)
        start = time.perf_counter()
        kept.put(made, features)
        results["store put s"] = round(time.perf_counter() - start, 2)
    results["saved, share of decode + fill"] = round(
        1
        - (results["decode s, keeping features"] + results["store put s"])
        / (results["decode s, plain"] + results["store fill s (the target pass it replaces)"]),
        3,
    )
    print(json.dumps(results, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
