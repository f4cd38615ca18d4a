#!/usr/bin/env bash
# The policy that learnt from greedy and T = 1 labels, beside the arms it chooses between: at T = 1 in batches of 1
# and 4 (the previous policy, greedy labels only, took 4 + copy there for every batch: `fixed=4+copy=5` is what it
# ran), and greedy at batch 1, where both take 4 + copy for all 8 problems. The run tagged b1_t1_this_cpus_costs
# gave the policy this machine's step costs (step_costs_amd_epyc.json, `policy.set_step_costs`):
#   blockpilot bench --target default --block-sizes 2,3,4,6,8,16 --batch-sizes 1,4 --repeats 24 --copy-tokens 5 --step-costs COSTS
#   blockpilot bench ... --tag b1_t1_this_cpus_costs --temperature 1 --batch-sizes 1 --policy POLICY_WITH_COSTS #     --methods fixed,fixed_copy,policy --block-sizes 1,2,4
#   bash results/archive/drafter_v3_2M/bench_cpu_sampling_policy/run.sh   (from the repository root; 5-10 minutes a run on 2 cores)
# A run whose results JSON exists is skipped, so a killed script resumes with the next run.
set -euo pipefail
source examples/jemalloc.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$(dirname "$0")}  # where the results go
# One run per line: name, temperature, batch size, methods, block sizes.
RUNS="b1_t1 1 1 plain,plain_measured,fixed,fixed_copy,policy 1,2,4
b4_t1 1 4 plain,plain_measured,fixed,fixed_copy,policy 1,2,4
b1_t0 0 1 plain,plain_measured,fixed,fixed_copy,policy 2,4"
while read -r tag temperature batch methods sizes; do
  if compgen -G "$OUT/results_${tag}*.json" > /dev/null; then echo "$tag: measured before"; continue; fi
  .venv/bin/blockpilot bench --target default --prompts humaneval --copy-tokens 5 --out "$OUT" --tag "$tag" \
    --limit 8 --max-new-tokens 128 --temperature "$temperature" --batch-sizes "$batch" \
    --methods "$methods" --block-sizes "$sizes" < /dev/null
done <<< "$RUNS"
