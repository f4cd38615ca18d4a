"""Epochs of the T = 1 head of the policy trained on greedy + T = 1 labels, chosen on held-out policy prompts only
(never on HumanEval): the estimated batch-1 decoding time of its choices at T = 1, summed over four random splits
of the 120 prompts (90 train / 30 held out, `--seed` 0-3). The trunk and the greedy head keep the shipped policy's
settings (30 epochs, width 64, weight decay 0.1, dropout 0.1), which make the greedy policy the previous one exactly.
    .venv/bin/python results/current/policy_sampling/sweep.py results/current/policy_sampling/sweep.json
"""

import contextlib
import io
import json
import sys
import tempfile

from blockpilot_hf.loading import default_drafter_path
from blockpilot_hf.training.policy import PolicyTrainingArguments, train_policy_from_files

LABELS = "results/current/labels"
settings = []
for head_epochs in (30, 100, 300, 1000, 3000):
    total = {"head_epochs": head_epochs, "heldout_T1_s": 0.0, "heldout_s": 0.0}
    for seed in range(4):
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            args = PolicyTrainingArguments(
                labels=f"{LABELS}/policy_prompts_b1-16_copy5.jsonl,{LABELS}/policy_prompts_b1-16_copy5_t1.jsonl",
                output_dir=out,
                objective="throughput",
                cost_file="results/current/step_costs_by_machine/intel_r_xeon_r_processor_amx_bf16_avx512_bf16.json",
                epochs=30,
                hidden_size=64,
                weight_decay=0.1,
                head_epochs=head_epochs,
                seed=seed,
            )
            _, report = train_policy_from_files(args, target_name="default", drafter_path=str(default_drafter_path()))
        total["heldout_T1_s"] += report["heldout_T1"]["time_policy_s"]
        total["heldout_s"] += report["heldout"]["time_policy_s"]
        total[f"T1_oracle_s_seed{seed}"] = report["heldout_T1"]["time_oracle_s"]
    settings.append(total)
    print(json.dumps(total), flush=True)
chosen = min(settings, key=lambda r: r["heldout_T1_s"])
json.dump({"chosen": chosen, "settings": settings}, open(sys.argv[1], "w"), indent=1)
print("chosen:", chosen)
