"""What reading the whole preallocated cache costs an eager verify step on CPU (the reason for
`compat.static_cache_prefix`).

    python results/verify_cost_by_slots_cpu.py      # writes results/verify_cost_by_slots_cpu.json

The default target, a batch of 16 rows with a 256-token context, one 4-token verify step: median milliseconds when the
step's attention reads every slot of a 512- or 1024-slot cache (what CUDA graphs do) and when it reads only the slots
in use (what the eager loop does).
"""

import json
import platform
from pathlib import Path

import torch

import blockpilot_hf.decoding as decoding
from blockpilot_hf import load_default
from blockpilot_hf.benchmark import measure_step_breakdown


@torch.no_grad()
def main():
    target, _, drafter, _ = load_default(device="cpu")
    result = {"cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "batch": 16,
              "context_length": 256, "block_size": 4, "verify_ms": {}}
    original_capacity, original_verify = decoding.cache_capacity, decoding.VerifyStep.run

    def reading_every_slot(step):
        step.key_length = None
        return original_verify(step)

    for capacity in (512, 1024):
        decoding.cache_capacity = lambda *args, capacity=capacity: capacity
        for reads, run in (("slots in use", original_verify), ("every slot", reading_every_slot)):
            decoding.VerifyStep.run = run
            breakdown = measure_step_breakdown(target, drafter, [4], (16,), repeats=6)
            result["verify_ms"][f"{capacity} slots, {reads}"] = 1e3 * breakdown["batch"][16]["blocks"][4]["verify"]
    decoding.cache_capacity, decoding.VerifyStep.run = original_capacity, original_verify
    print(json.dumps(result, indent=1))
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
