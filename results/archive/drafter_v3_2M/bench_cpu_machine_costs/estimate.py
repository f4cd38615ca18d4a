"""The shipped policy's choices on all 164 HumanEval problems (its labels: greedy and T = 1, 256 new tokens) priced
with each machine's step costs at batch 1: seconds of decode steps for the policy, every fixed arm, the per-prompt
oracle and plain steps. An estimate (steps x step cost; no prefill, no per-request overhead), over the whole set,
where the benches beside it time 8 problems end to end.

    .venv/bin/python results/archive/drafter_v3_2M/bench_cpu_machine_costs/estimate.py   (seconds, from the repository root)
"""

import json
from pathlib import Path

from blockpilot_hf import BlockPolicy
from blockpilot_hf.configuration import Arm
from blockpilot_hf.default_model import DEFAULT_POLICY_PATH
from blockpilot_hf.training.policy import (
    best_arms,
    cost_file_paths,
    evaluate,
    feature_matrix,
    load_step_costs,
    ordered_arms,
    read_label_files,
    step_costs_machine,
)

LABELS = {
    "greedy": "results/current/labels/humaneval_b1-16_copy5.jsonl",
    "T=1": "results/current/labels/humaneval_b1-16_copy5_t1.jsonl",
}
policy = BlockPolicy.from_pretrained(DEFAULT_POLICY_PATH)
estimates = {}
for path in cost_file_paths("results/current/step_costs_by_machine"):
    policy.set_step_costs(load_step_costs(path), "cpu")  # as the default: `evaluate` prices by it
    costs = policy.step_costs_for(1)
    for decoding, labels in LABELS.items():
        rows = read_label_files(labels)
        best = best_arms(rows, ordered_arms([*policy.config.arms, Arm(1)]), "throughput", costs)
        report = evaluate(policy, rows, feature_matrix(rows, policy.config.feature, None), best, costs)
        fixed = report["time_fixed_s"]
        best_fixed = min((key for key in fixed if key != "1"), key=fixed.get)
        estimates.setdefault(step_costs_machine(path), {})[decoding] = {
            "policy_s": report["time_policy_s"],
            "best_fixed_arm": best_fixed,
            "best_fixed_s": fixed[best_fixed],
            "oracle_s": report["time_oracle_s"],
            "plain_steps_s": fixed["1"],
            "policy_vs_best_fixed": fixed[best_fixed] / report["time_policy_s"],
            "policy_vs_oracle": report["time_oracle_s"] / report["time_policy_s"],
            "policy_vs_plain_steps": fixed["1"] / report["time_policy_s"],
            "choices": {arm: n for arm, n in report["chosen_histogram"].items() if n},
        }
out = Path(__file__).with_name("estimate.json")
out.write_text(json.dumps(estimates, indent=1))
for machine, by_decoding in estimates.items():
    for decoding, e in by_decoding.items():
        print(
            f"{machine} | {decoding}: policy {e['policy_s']:.1f} s, best fixed {e['best_fixed_arm']} "
            f"{e['best_fixed_s']:.1f} s ({e['policy_vs_best_fixed']:.3f}x), {e['policy_vs_oracle']:.1%} of the "
            f"oracle, {e['policy_vs_plain_steps']:.2f}x plain steps"
        )
