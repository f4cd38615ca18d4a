#!/usr/bin/env bash
# The shipped policy deciding by this machine's own step costs: the runs of ../bench_cpu_sampling_policy/ (T = 1 at
# batch 1 and 4, greedy at batch 1), which ran on this 2-core AMD EPYC with the Intel Xeon's table. The policy keeps a
# table per machine (`config.step_costs_by_machine`) and decides by the serving machine's; this machine's is measured
# first where results/current/step_costs_by_machine/ lacks it (~5 minutes; then give it to the policy, `make policy` or
# `policy.set_step_costs(load_step_costs(path), machine=step_costs_machine(path))`, before the bench means anything):
#   bash results/archive/drafter_v3_2M/bench_cpu_machine_costs/run.sh   (from the repository root; 5-10 minutes a run on 2 cores)
set -euo pipefail
source examples/jemalloc.sh
COSTS=results/current/step_costs_by_machine
here=$(.venv/bin/python -c 'from blockpilot_hf.hardware import machine_file_name, machine_of; print(machine_file_name(machine_of("cpu")))')
[ -f "$COSTS/$here" ] || .venv/bin/blockpilot bench --target default --block-sizes 2,3,4,6,8,16 --batch-sizes 1,2,4,8,16 \
    --repeats 24 --copy-tokens 5 --step-costs "$COSTS" < /dev/null
OUT=$(dirname "$0") bash results/archive/drafter_v3_2M/bench_cpu_sampling_policy/run.sh
