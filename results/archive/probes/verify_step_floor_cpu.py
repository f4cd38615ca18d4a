"""Where a 4-token verify step of the default target goes on this CPU, and two ways to make it cheaper that were
measured and not adopted. `python results/verify_step_floor_cpu.py` writes `results/verify_step_floor_cpu.json`:

- `eager_packed_ms`: the verify step as decoding runs it (`decoding.target_block_forward`, static cache, 256-token
  context, packed linear products), median ms; `profile`: the share of its time in the packed products;
- `compiled_packed_ms`: the same step through `torch.compile`, its linear layers replaced by a custom op around the
  packed product (inductor cannot lower oneDNN's op over a packed weight itself), reading the whole cache (fixed
  shapes), timed interleaved with the eager step (`interleaved_eager_ms`); `compile_s`, and how far its logits are
  from the eager step's;
- `products_ms`: the model's linear products alone, as they are (7 per layer) and with q/k/v and gate/up fused into
  one product each (4 per layer), random weights of SmolLM2's shapes, at 1 / 4 / 16 rows.
"""

import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

from blockpilot_hf.compat import new_static_cache
from blockpilot_hf.cpu_linear import PackedLinear
from blockpilot_hf.decoding import target_block_forward
from blockpilot_hf.default_model import load_default

CAPACITY, CONTEXT, BLOCK, LAYER_IDS = 512, 256, 4, [1, 27]
_packed_layers: list[tuple[torch.Tensor, torch.Tensor | None]] = []


@torch.library.custom_op("blockpilot_results::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, layer: int) -> torch.Tensor:
    weight, bias = _packed_layers[layer]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear_op.register_fake
def _(x, layer):
    return x.new_empty(*x.shape[:-1], _packed_layers[layer][0].shape[0])


class OpaquePackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        _packed_layers.append((torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()), linear.bias))
        self.layer = len(_packed_layers) - 1

    def forward(self, x):
        return packed_linear_op(x, self.layer)


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def products_ms(rows: int, fused: bool, layers: int = 30) -> float:
    pack = torch.ops.mkldnn._reorder_linear_weight
    shapes = (
        [(960, 576), (576, 576), (3072, 576), (576, 1536)]
        if fused
        else [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    )
    weights = [[pack(torch.randn(shape)) for shape in shapes] for _ in range(layers)]
    x, wide = torch.randn(1, rows, 576), torch.randn(1, rows, 1536)

    def run():
        for layer in weights:
            for w in layer:
                torch.ops.mkldnn._linear_pointwise(wide if w.shape[1] == 1536 else x, w, None, "none", [], "")

    return median_ms(run)


@torch.no_grad()
def main():
    target, _, _, _ = load_default(device="cpu", with_artifacts=False)
    cache = new_static_cache(target.config, CAPACITY)
    slot_valid = torch.zeros(1, CAPACITY, dtype=torch.bool)
    slot_valid[:, :CONTEXT] = True
    prompt = torch.randint(100, 1000, (1, CONTEXT))
    with PackedLinear():
        target_block_forward(
            target,
            cache,
            slot_valid,
            prompt,
            torch.arange(CONTEXT)[None],
            torch.tensor(0),
            LAYER_IDS,
            key_length=CONTEXT,
        )
    block, positions = torch.randint(100, 1000, (1, BLOCK)), torch.arange(CONTEXT, CONTEXT + BLOCK)[None]

    def step(key_length=CONTEXT + BLOCK):
        valid = slot_valid.clone()
        valid[:, CONTEXT : CONTEXT + BLOCK] = True
        offset = torch.tensor(CONTEXT)
        return target_block_forward(target, cache, valid, block, positions, offset, LAYER_IDS, key_length=key_length)

    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    with PackedLinear():
        reference = step()[0]
        results["eager_packed_ms"] = median_ms(step)
        with profile() as prof:
            for _ in range(10):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    linear = sum(e.self_cpu_time_total for e in events if e.key == "mkldnn::_linear_pointwise")
    results["profile"] = {"linear_share": linear / total, "profiled_step_ms": total / 10 / 1000}

    for module in list(target.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OpaquePackedLinear(child))
    compiled = torch.compile(lambda: step(None), dynamic=False)
    start = time.perf_counter()
    logits = compiled()[0]
    results["compile_s"] = time.perf_counter() - start
    results["compiled_max_abs_logit_diff"] = float((logits - reference).abs().max())
    results["compiled_same_argmax"] = bool((logits.argmax(-1) == reference.argmax(-1)).all())
    # Interleaved with the eager step (same products, through the same custom op), so that drift of this machine's
    # speed during the run hits both alike.
    eager_times, compiled_times = [], []
    for _ in range(3):
        step(), compiled()
    for _ in range(40):
        for fn, times in ((step, eager_times), (compiled, compiled_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    results["interleaved_eager_ms"] = 1000 * sorted(eager_times)[20]
    results["compiled_packed_ms"] = 1000 * sorted(compiled_times)[20]
    results["products_ms"] = {
        str(rows): {"separate": products_ms(rows, False), "fused_qkv_gate_up": products_ms(rows, True)}
        for rows in (1, 4, 16)
    }
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
