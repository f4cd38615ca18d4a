"""The benchmark (`blockpilot_hf.benchmark`): one process and two (gloo on CPU via `accelerate.debug_launcher`)."""

import json
import os

import pytest
import torch

from blockpilot_hf import BlockPolicy, BlockPolicyConfig, DFlashDrafter, benchmark, cli
from blockpilot_hf.hardware import cpu_description, machine_file_name, machine_of
from blockpilot_hf.training.policy import load_step_costs, step_costs_device, step_costs_machine
from helpers.models import make_smol_target
from helpers.smollm2 import REAL_LOOKING_PROMPTS, SMOL_MASK, write_prompts_jsonl

LABELS = [
    "plain", "plain_weight_major", "plain_packed", "plain_measured", "prompt_lookup", "fixed=2", "fixed=4", "fixed=2+copy=3",
    "fixed=4+copy=3", "policy",
]


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory, saved_smol_target):
    """Prompts JSONL, drafter and policy directories for the saved tiny SmolLM2-vocabulary target."""
    root = tmp_path_factory.mktemp("bench_inputs")
    target = make_smol_target(seed=0)
    torch.manual_seed(0)
    drafter = DFlashDrafter.from_target(target, num_layers=1, block_size=4, mask_token_id=SMOL_MASK)
    drafter.save_pretrained(root / "drafter")
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2, 4], hidden_size=8)
    policy.save_pretrained(root / "policy")
    prompts = write_prompts_jsonl(root / "prompts.jsonl", REAL_LOOKING_PROMPTS[:3], ["b/0", "b/1", "b/2"])
    return saved_smol_target, prompts, root / "drafter", root / "policy"


def bench_args(bench_inputs, out, *extra):
    target, prompts, drafter, policy = bench_inputs
    return cli.build_parser().parse_args([
        "bench", "--target", str(target), "--prompts", str(prompts), "--methods", "plain,plain_weight_major,plain_packed,plain_measured,prompt_lookup,fixed,fixed_copy,policy",
        "--block-sizes", "2,4", "--copy-tokens", "3", "--drafter", str(drafter), "--policy", str(policy), "--max-new-tokens", "10",
        "--out", str(out), *extra,
    ])


def check_results(out, processes):
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("Target ")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = [(r["prompt_id"], r["label"]) for r in results["records"]]
    assert sorted(pairs) == sorted((p, label) for p in ("b/0", "b/1", "b/2") for label in LABELS)  # each exactly once
    meta, summary = results["meta"], results["summary"]
    assert meta["prompts"] == 3 and meta["processes"] == processes
    assert set(summary) == set(LABELS) | {"oracle_tau", "oracle_time"}
    for label, entry in summary.items():
        assert entry["prompts"] == 3
        if label != "plain":
            assert entry["identical_to_plain"] == 1.0, label  # greedy: every method is lossless
    for label in ("fixed=2", "fixed=4", "policy", "oracle_tau"):
        assert summary[label]["tau"] >= 1.0
    assert summary["fixed=2"]["block_sizes"] == {"2": 3}
    assert set(summary["policy"]["block_sizes"]) <= {"2", "4"}
    return results


def test_benchmark_single_process(tmp_path, bench_inputs, capsys):
    out = tmp_path / "bench"
    summary = benchmark.main(bench_args(bench_inputs, out))
    results = check_results(out, processes=1)
    assert set(summary) == set(results["summary"])
    assert "| fixed=4 |" in capsys.readouterr().out
    # the oracle picks, per prompt, the best-tau fixed run (ties -> the smaller block)
    by_prompt = {}
    for r in results["records"]:
        by_prompt.setdefault(r["prompt_id"], {})[r["label"]] = r
    chosen = []
    for runs in by_prompt.values():
        two, four = runs["fixed=2"], runs["fixed=4"]
        chosen.append(4 if four["tau"] > two["tau"] else 2)
    assert sum(chosen) / 3 == pytest.approx(
        sum(int(b) * n for b, n in results["summary"]["oracle_tau"]["block_sizes"].items()) / 3
    )


def _bench_worker(args):
    """Runs in each process `debug_launcher` forks: drop the parent's (single-process) accelerate state first.

    On a machine without an accelerator, a bare `PartialState()` (what `benchmark.main` calls) ignores
    `ACCELERATE_USE_CPU` and reports one process even under a multi-process launch; `PartialState(cpu=True)` (what
    `Accelerator` does with that variable set) sees both. Initialise it that way so `benchmark.main` reuses it.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ["OMP_NUM_THREADS"] = "1"  # else accelerate sets 2+ threads per process: oversubscribed, 30x slower
    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    assert state.num_processes == 2
    benchmark.main(args)


def test_benchmark_two_processes(tmp_path, bench_inputs):
    from accelerate import debug_launcher

    out = tmp_path / "bench2"
    debug_launcher(_bench_worker, args=(bench_args(bench_inputs, out),), num_processes=2)
    check_results(out, processes=2)


def test_measure_step_costs(bench_inputs):
    target = make_smol_target(seed=0)
    drafter = DFlashDrafter.from_pretrained(bench_inputs[2]).eval()
    costs = benchmark.measure_step_costs(target, drafter, [2, 4], [1, 3], context_length=12, repeats=2)
    assert set(costs) == {1, 3}
    for table in costs.values():
        assert set(table) == {"1", "2", "4"}  # 1: a plain step, no drafter
        assert all(isinstance(c, float) and c > 0 for c in table.values())
    # with a copy chain: each block size also verified beside 3 copied tokens, and the chain alone ("1+3")
    breakdown = benchmark.measure_step_breakdown(target, drafter, [2, 4], [2], context_length=12, repeats=2, copy_tokens=3)
    assert set(breakdown["batch"][2]["copy"]) == {1, 2, 4} and "draft" not in breakdown["batch"][2]["copy"][1]
    assert set(benchmark.step_cost_table(breakdown)[2]) == {"1", "2", "4", "1+3", "2+3", "4+3"}


def test_benchmark_step_costs_file(tmp_path, bench_inputs):
    path = tmp_path / "costs" / "steps.json"
    costs = benchmark.main(bench_args(bench_inputs, tmp_path / "unused", "--step-costs", str(path), "--repeats", "2"))
    saved = json.loads(path.read_text())
    assert set(saved) == {"device", "machine", "1"} and saved["device"] == "cpu"
    assert set(saved["1"]) == {"1", "2", "4", "1+3", "2+3", "4+3"} and all(v > 0 for v in saved["1"].values())
    assert set(costs) == {1} and set(costs[1]) == set(saved["1"])
    # the file is what train-policy's --cost-file and the policy's config take, with the copy chain or without
    assert step_costs_device(str(path)) == "cpu" and step_costs_machine(str(path)) == machine_of("cpu")
    for copy_tokens in (0, 3):
        BlockPolicyConfig(candidate_block_sizes=[2, 4], copy_tokens=copy_tokens, step_costs=load_step_costs(str(path)))
    with pytest.raises(ValueError, match=r"missing \['1\+5', '2\+5', '4\+5'\].*--step-costs --copy-tokens N"):
        BlockPolicyConfig(candidate_block_sizes=[2, 4], copy_tokens=5, step_costs=load_step_costs(str(path)))
    # into a folder of tables, one per machine, it is named after this one
    folder = path.parent
    benchmark.main(bench_args(bench_inputs, tmp_path / "unused", "--step-costs", str(folder), "--repeats", "1"))
    assert step_costs_machine(str(folder / machine_file_name(machine_of("cpu")))) == machine_of("cpu")


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="Linux names its CPU in /proc/cpuinfo")
def test_cpu_description_names_the_model_and_its_bf16_instructions():
    # A bench's numbers belong to one CPU: its model name and whether it has bf16 dot products go into the results.
    cpuinfo = open("/proc/cpuinfo").read()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    description = cpu_description()
    assert not names or description.startswith(names[0] + ", ")
    flags = set(cpuinfo.split())
    for flag in ("amx_bf16", "avx512_bf16"):
        assert (flag in description) == (flag in flags)
    assert ("no bf16 instructions" in description) == (not flags & {"amx_bf16", "avx512_bf16"})
    assert machine_of("cpu") == machine_of(torch.device("cpu")) == f"cpu: {description}"
