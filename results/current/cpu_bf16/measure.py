"""bf16 against fp32 on this CPU: one `linear` (4096x576 by 576x1536, the shape of a SmolLM2-135M MLP product over
a batch of tokens) and a forward of the default target over 8 x 512 tokens, in each dtype, side by side in one run.
Which dtype the long CPU jobs use follows from it (examples/cpu_dtype.sh).

Run: .venv/bin/python results/current/cpu_bf16/measure.py OUT_JSON   (nothing else running on the machine)
"""

import json
import sys
import time

import torch

from blockpilot_hf.hardware import cpu_description
from blockpilot_hf.loading import load_target


def best_seconds(fn, repeats: int) -> float:
    fn()  # oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


results = {
    "cpu": cpu_description(),  # model name and bf16 instructions, as bench results name them
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "linear_tflops": {},
    "target_forward_tokens_per_s": {},
}
torch.manual_seed(0)
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, w = torch.randn(4096, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    seconds = best_seconds(lambda: torch.nn.functional.linear(a, w), 20)
    results["linear_tflops"][name] = 2 * 4096 * 576 * 1536 / seconds / 1e12
    target, _ = load_target("default", dtype)
    ids = torch.randint(0, target.config.vocab_size, (8, 512))
    with torch.inference_mode():
        seconds = best_seconds(lambda: target.model(input_ids=ids), 3)
    results["target_forward_tokens_per_s"][name] = ids.numel() / seconds
    print(
        f"{name}: linear {results['linear_tflops'][name]:.3f} TFLOPS, target forward over 8x512 tokens "
        f"{results['target_forward_tokens_per_s'][name]:.0f} tokens/s",
        flush=True,
    )
with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=1)
