"""The forms of `cpu_linear` on this CPU: the target over n new tokens (256-token context, fp32), median ms, with the
usual `linear`, with the weight-major products under a `TorchFunctionMode` (how `WeightMajorLinear` worked first: it
sees every torch call), with them through the swapped `nn.Linear.forward` (how it works now), and with oneDNN's linear
over packed weights (`PackedLinear`). `python results/linear_forms_cpu.py` writes `results/linear_forms_cpu.json`.
"""

import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

from blockpilot_hf.compat import cache_kwargs
from blockpilot_hf.cpu_linear import PackedLinear, WeightMajorLinear, weight_major_linear
from blockpilot_hf.default_model import load_default


class WeightMajorFunctionMode(TorchFunctionMode):
    """The earlier implementation: intercept `F.linear` among all torch calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            out = weight_major_linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
            if out is not None:
                return out
        return func(*args, **kwargs)


@torch.no_grad()
def main(repeats: int = 15):
    target, _, _, _ = load_default(device="cpu", with_artifacts=False)
    context = torch.randint(100, 1000, (1, 256))
    forms = {
        "linear": contextlib.nullcontext,
        "function_mode": WeightMajorFunctionMode,
        "swapped_forward": WeightMajorLinear,
        "packed": PackedLinear,
    }
    result = {"cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    for n in (1, 2, 4, 8, 16, 32, 64):
        cache = DynamicCache(config=target.config)
        target(context, use_cache=True, **cache_kwargs(target, cache))
        new = torch.randint(100, 1000, (1, n))
        times = {name: [] for name in forms}
        for _ in range(repeats + 2):  # interleaved, so that every form sees the same machine state
            for name, form in forms.items():
                start = time.perf_counter()
                with form():
                    target(new, use_cache=True, logits_to_keep=0, **cache_kwargs(target, cache))
                times[name].append(time.perf_counter() - start)
                cache.crop(-n)
        result[f"{n}_tokens_ms"] = {name: 1e3 * sorted(t[2:])[len(t[2:]) // 2] for name, t in times.items()}
        print(n, result[f"{n}_tokens_ms"])
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
