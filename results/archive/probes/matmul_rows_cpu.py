"""Where a CPU decoding step goes: the default target's decoder layers and LM head, timed by rows (tokens).

    python results/matmul_rows_cpu.py            # writes results/matmul_rows_cpu.json

Median milliseconds of (a) the target's decoder layers over n new tokens at a 256-token context and (b) its LM head
(49152 x 576) over n rows, in fp32 and in bf16 (the dtype `drafter_dtype_for` gives the drafter on CPUs with fast
bf16), through `greedy_proposals` (a 2D product) and, for comparison, as a bf16 `linear` on the 3D slice `hidden[:, 1:]`;
(c) one pass of n-row products over all of the target's linear weights, through `linear` and weight-major; (a) and the fp32 head again under `cpu_linear.WeightMajorLinear`. The
README's "where the time goes" and the comments in `modeling_drafter.py` and `cpu_linear.py` quote these numbers.
"""

import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from blockpilot_hf import load_default
from blockpilot_hf.compat import cache_kwargs
from blockpilot_hf.cpu_linear import WeightMajorLinear
from blockpilot_hf.modeling_drafter import greedy_proposals


def median_ms(fn, repeats=15):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


@torch.no_grad()
def main():
    target, _, _, _ = load_default(device="cpu", with_artifacts=False)
    head = target.get_output_embeddings()
    bf16_head = torch.nn.Linear(head.in_features, head.out_features, bias=False, dtype=torch.bfloat16)
    bf16_head.weight.copy_(head.weight)
    bf16_head.requires_grad_(False)  # frozen, like `draft_head`'s copy
    rows = [1, 2, 3, 4, 8, 16]
    result = {"cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    result["head_fp32_ms"] = {n: median_ms(lambda n=n: greedy_proposals(head, torch.randn(1, n, 576))) for n in rows}
    with WeightMajorLinear():
        result["head_fp32_weight_major_ms"] = {
            n: median_ms(lambda n=n: greedy_proposals(head, torch.randn(1, n, 576))) for n in rows
        }
    result["head_bf16_ms"] = {n: median_ms(lambda n=n: greedy_proposals(bf16_head, torch.randn(1, n, 576))) for n in rows}
    # what `greedy_proposals` avoids by running the product on a 2D view: `linear` on the block without its anchor
    blocks = {n: torch.randn(1, n + 1, 576).to(torch.bfloat16) for n in rows}
    result["head_bf16_3d_slice_ms"] = {n: median_ms(lambda n=n: bf16_head(blocks[n][:, 1:])) for n in rows}
    weights = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)]  # the head is tied: counted once
    inputs = {n: {k: torch.randn(n, k) for k in {w.shape[1] for w in weights}} for n in rows}
    result["all_linear_weights_pass_ms"] = {
        form: {n: median_ms(lambda n=n: [product(inputs[n][w.shape[1]], w) for w in weights], repeats=7) for n in rows}
        for form, product in (("linear", torch.nn.functional.linear), ("weight_major", lambda x, w: torch.mm(w, x.T)))
    }
    context = torch.randint(100, 1000, (1, 256))
    forms = {"decoder_layers_fp32_ms": contextlib.nullcontext, "decoder_layers_fp32_weight_major_ms": WeightMajorLinear}
    for key, form in forms.items():
        layers = {}
        for n in (1, 2, 4, 8, 16):
            cache = DynamicCache(config=target.config)
            target(context, use_cache=True, **cache_kwargs(target, cache))
            new = torch.randint(100, 1000, (1, n))

            def step():
                with form():
                    target.model(new, use_cache=True, **cache_kwargs(target.model, cache))
                cache.crop(-n)  # drop the n new entries again

            layers[n] = median_ms(step)
        result[key] = layers
    print(json.dumps(result, indent=1))
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
