"""The policy's training epochs, chosen on held-out policy prompts only (never on HumanEval): for each setting of the
trunk's epochs (`--epochs`, trunk and greedy head on the greedy labels) and the T = 1 head's (`--head-epochs`), the
estimated batch-1 decoding time of its choices on the held-out prompts, greedy plus T = 1, summed over four random
splits of the 120 prompts (90 train / 30 held out, `--seed` 0-3), from the step costs of `--cost-file` (default: the
tables in results/current/step_costs_by_machine), and the mean absolute error of its predicted tau there over the
arms and both temperatures. The other settings are `make policy`'s (width 64, weight decay 0.1, dropout 0.1).
    .venv/bin/python results/current/policy_sampling/sweep.py results/current/policy_sampling/sweep.json \
        --epochs 30,100,300,1000 --head-epochs 100,300
"""

import argparse
import contextlib
import io
import json
import tempfile

from blockpilot_hf.loading import default_drafter_path
from blockpilot_hf.training.policy import PolicyTrainingArguments, train_policy_from_files

LABELS = "results/current/labels"
GREEDY, SAMPLED = f"{LABELS}/policy_prompts_b1-16_copy5.jsonl", f"{LABELS}/policy_prompts_b1-16_copy5_t1.jsonl"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", default="30")
    parser.add_argument("--head-epochs", default="30,100,300,1000,3000")
    parser.add_argument("--cost-file", default="results/current/step_costs_by_machine")
    args = parser.parse_args()
    settings = []
    for epochs in map(int, args.epochs.split(",")):
        for head_epochs in map(int, args.head_epochs.split(",")):
            total = {"epochs": epochs, "head_epochs": head_epochs, "heldout_s": 0.0, "heldout_T1_s": 0.0}
            for seed in range(4):
                with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
                    training = PolicyTrainingArguments(
                        labels=f"{GREEDY},{SAMPLED}",
                        output_dir=out,
                        objective="throughput",
                        cost_file=args.cost_file,
                        epochs=epochs,
                        hidden_size=64,
                        weight_decay=0.1,
                        head_epochs=head_epochs,
                        seed=seed,
                    )
                    _, report = train_policy_from_files(
                        training, target_name="default", drafter_path=str(default_drafter_path())
                    )
                total["heldout_s"] += report["heldout"]["time_policy_s"]
                total["heldout_T1_s"] += report["heldout_T1"]["time_policy_s"]
                oracle = report["heldout"]["time_oracle_s"] + report["heldout_T1"]["time_oracle_s"]
                total[f"oracle_s_seed{seed}"] = oracle
                errors = [e for part in ("heldout", "heldout_T1") for e in report[part]["tau_abs_error"].values()]
                total[f"tau_abs_error_seed{seed}"] = sum(errors) / len(errors)
            total["heldout_both_s"] = total["heldout_s"] + total["heldout_T1_s"]
            settings.append(total)
            print(json.dumps(total), flush=True)
    fastest = min(settings, key=lambda r: r["heldout_both_s"])
    json.dump({"fastest": fastest, "settings": settings}, open(args.out, "w"), indent=1)
    print("fastest:", fastest)


if __name__ == "__main__":
    main()
