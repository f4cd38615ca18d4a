"""Batch 4 (issue 17): do step costs x per-row tau rank the fixed arms as the bench measured them? Three models of a
batch's tokens/s from the measured per-row tau and `step_costs.json`: the policy's (sum of tau / step cost), the slowest
row's (batch x min tau / cost) and the longest row's steps (tokens / (max steps x cost)), next to the measured tokens/s.

Run: python3 results/current/bench_cpu_copy_policy/batch_models.py > results/current/bench_cpu_copy_policy/batch_models.txt
"""

import json

r = json.load(open("results/current/bench_cpu_copy_policy/results_b4_t0_batch4.json"))
costs = json.load(open("results/current/step_costs_by_machine/intel_r_xeon_r_processor_amx_bf16_avx512_bf16.json"))["4"]
recs = [x for x in r["records"] if x["label"].startswith("fixed")]
batches = [
    ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3"],
    ["HumanEval/4", "HumanEval/5", "HumanEval/6", "HumanEval/7"],
]
for batch in batches:
    print(batch[0])
    for lab in sorted({x["label"] for x in recs}):
        rows = [x for x in recs if x["label"] == lab and x["prompt_id"] in batch]
        arm = lab.split("=", 1)[1].replace("+copy=", "+")
        taus = [sum(x["acceptance_lengths"]) / len(x["acceptance_lengths"]) for x in rows]
        steps = [len(x["acceptance_lengths"]) for x in rows]
        measured = sum(x["new_tokens"] for x in rows) / sum(x["seconds"] for x in rows)
        c = costs[arm]
        print(
            f"  {arm:5s} measured {measured:5.1f} tok/s | sum-tau model {sum(taus) / c:6.1f} | min-tau model {4 * min(taus) / c:6.1f} | max-steps model {sum(x['new_tokens'] for x in rows) / (max(steps) * c):6.1f}"
        )
