"""Every script in examples/ runs, on tiny models (and the quickstart on the real default), so none can rot."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockpilot_hf import DFlashDrafter
from blockpilot_hf.hardware import machine_file_name, machine_of
from blockpilot_hf.training.data import split_prompts
from helpers.models import make_smol_target
from helpers.smollm2 import REAL_LOOKING_PROMPTS, SMOL_MASK, write_prompts_jsonl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(cmd, env=None, timeout=600):
    # Shell examples call `python3` / `accelerate` from PATH: make that this interpreter's environment (CI does not
    # activate the virtual environment).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    environment = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=timeout, cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tiny_pair(saved_smol_target, tmp_path_factory):
    drafter_dir = tmp_path_factory.mktemp("example_drafter")
    DFlashDrafter.from_target(make_smol_target(enable=False), num_layers=1, block_size=4, mask_token_id=SMOL_MASK).save_pretrained(
        drafter_dir
    )
    return str(saved_smol_target), str(drafter_dir)


@pytest.mark.slow
def test_quickstart_on_the_default_model():
    out = run([sys.executable, "examples/quickstart.py", "Say hello.", "--max-new-tokens", "12"])
    assert out.count("identical to plain greedy: True") == 2  # fixed block size, then the policy
    assert "identical to plain batched greedy: True" in out
    assert "three samples" in out and "identical to the pipeline without the drafter: True" in out


def test_load_from_hub_example(tiny_pair):
    target, drafter = tiny_pair
    out = run([sys.executable, "examples/load_from_hub.py", "--target", target, "--drafter", drafter, "--max-new-tokens", "6"])
    assert "block size 4" in out


def test_multi_gpu_bench_example_on_cpu(tiny_pair, tmp_path):
    target, drafter = tiny_pair
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", REAL_LOOKING_PROMPTS[:2])
    env = {
        "NUM_PROCESSES": "1", "TARGET": target, "DRAFTER": drafter, "DTYPE": "fp32", "PROMPTS": str(prompts),
        "MAX_NEW_TOKENS": "6", "METHODS": "plain,fixed", "BLOCK_SIZES": "2,4", "OUT": str(tmp_path / "bench"),
        "ACCELERATE_USE_CPU": "true",
    }
    run(["bash", "examples/multi_gpu_bench.sh"], env=env)
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert {r["label"] for r in results["records"]} == {"plain", "fixed=2", "fixed=4"}
    assert results["summary"]["fixed=4"]["identical_to_plain"] == 1.0


@pytest.mark.long
def test_train_your_own_example(saved_smol_target, tmp_path):
    rows = [{"prompt_id": f"p{i}", "prompt": REAL_LOOKING_PROMPTS[i % len(REAL_LOOKING_PROMPTS)] + f" ({i})"} for i in range(40)]
    split = split_prompts(rows)
    assert len(split["policy"]) >= 4 and len(split["drafter"]) >= 4
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        "TARGET": str(saved_smol_target), "OUT": str(tmp_path / "own"), "PROMPTS": str(prompts), "NUM_PROMPTS": "4",
        "LABEL_PROMPTS": "4", "MAX_NEW_TOKENS": "6", "LAYERS": "1", "BLOCK_SIZE": "4", "MAX_STEPS": "2",
    }
    out = run(["bash", "examples/train_your_own.sh"], env=env)
    assert "held-out report" in out
    report = json.loads((tmp_path / "own" / "policy" / "training_report.json").read_text())
    assert report["heldout"]["prompts"] >= 1
    assert json.loads((tmp_path / "own" / "policy" / "config.json").read_text())["candidate_block_sizes"] == [2, 3, 4, 5, 6]
    drafter_config = json.loads((tmp_path / "own" / "drafter" / "config.json").read_text())
    assert 1 <= drafter_config["draft_vocab_size"] <= 8 * 6  # distinct tokens of 4 prompts x (greedy + sampled) x 6
    assert "draft vocabulary of" in out



def _allocator_probe(setup: str) -> tuple[str, str]:
    """`(LD_PRELOAD, MALLOC_CONF)` after sourcing examples/jemalloc.sh behind `setup`, with a torch sum run under it."""
    probe = (
        f'unset LD_PRELOAD MALLOC_CONF JEMALLOC; {setup}; source examples/jemalloc.sh; '
        'echo "${LD_PRELOAD:-none}|${MALLOC_CONF:-none}"; python3 -c "import torch; print(float(torch.ones(4).sum()))"'
    )
    chosen, total = run(["bash", "-c", probe]).strip().splitlines()[-2:]
    assert total == "4.0"  # torch runs under the chosen allocator
    preload, conf = chosen.split("|")
    return preload, conf


def test_the_long_jobs_preload_jemalloc_where_installed():
    places = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64")
    installed = [f"{place}/libjemalloc.so.2" for place in places if os.path.isfile(f"{place}/libjemalloc.so.2")]
    preload, conf = _allocator_probe("true")
    if installed:
        assert (preload, conf) == (installed[0], "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    else:
        assert (preload, conf) == ("none", "none")
    assert _allocator_probe("export JEMALLOC=0") == ("none", "none")
    # A user's own preload is left alone (libm: a library every glibc system has, harmless to preload).
    assert _allocator_probe("export LD_PRELOAD=libm.so.6") == ("libm.so.6", "none")


@pytest.mark.long
def test_drafter_study_leaves_points_for_later_and_rejects_unknown_ablations(tmp_path):
    # The study runs for days across sessions: points the data does not hold yet wait (and write no result), and a
    # misspelt ablation stops it before any training rather than hours later.
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    env = {"DATA": str(data), "RUNS": str(tmp_path / "runs"), "RESULTS": str(results), "PYTHON": sys.executable}
    env["BLOCKPILOT"] = str(Path(sys.executable).parent / "blockpilot")
    ablations = "gamma-4 1-epoch-3x-data"
    out = run(["bash", "examples/drafter_study.sh"], env={**env, "POINTS": "1000 2000", "ABLATIONS": ablations})
    assert "0 response tokens" in out
    for name in ("curve-250000", "ablations-250000/gamma-4", "curve-1000", "curve-2000"):
        assert f"{name}: needs" in out and "left for a later run" in out
    # One epoch over three times the rows: the baseline's steps, each row seen once.
    assert "ablations-250000/1-epoch-3x-data: needs 750000 response tokens" in out
    assert not results.exists()

    # A point labelled on an earlier machine (its committed record) is not trained again; a half record is.
    record = results / "study_runs" / "curve-1000" / "humaneval_labels.jsonl"
    record.parent.mkdir(parents=True)
    record.write_text('{"prompt_id": "HumanEval/0"}\n' * 164)
    (results / "study_runs" / "curve-2000").mkdir()
    (results / "study_runs" / "curve-2000" / "humaneval_labels.jsonl").write_text('{"prompt_id": "HumanEval/0"}\n')
    # The target's HumanEval answers kept with the records seed the new machine's runs.
    answers = '{"prompt_id": "HumanEval/0", "max_new_tokens": 256, "input_ids": [1, 2]}\n'
    (results / "study_runs" / "humaneval_continuations.jsonl").write_text(answers)
    out = run(["bash", "examples/drafter_study.sh"], env={**env, "STUDY": "curve", "POINTS": "1000 2000"})
    assert "curve-1000: labelled on all 164 problems before" in out and "curve-1000: needs" not in out
    assert "curve-2000: needs" in out
    assert (tmp_path / "runs" / "humaneval_continuations.jsonl").read_text() == answers

    environment = {**os.environ, **env, "ABLATIONS": "gamma-4 gama-10"}
    failed = subprocess.run(
        ["bash", "examples/drafter_study.sh"], capture_output=True, text=True, env=environment, cwd=EXAMPLES.parent
    )
    assert failed.returncode != 0
    assert "unknown ablation 'gama-10'" in failed.stderr and "gamma-10" in failed.stderr
    assert "left for a later run" not in failed.stdout


def test_snapshot_data_copies_shards_up_to_their_last_complete_line_and_data_merge_restores_them(tmp_path):
    # The repository's copy is what a new machine resumes from: the open shard too (a session's end would lose its
    # rows), but never a half-written last line, a copy rewritten only when its shard changed, and never over rows
    # that only the copy holds.
    from blockpilot_hf.training.data import ResponseShards, read_responses

    data, rows_dir, restored = tmp_path / "data", tmp_path / "rows", tmp_path / "restored"
    rows = [
        {"prompt_id": f"sharegpt/{i}", "mode": "greedy", "prompt_len": 2, "input_ids": [1, 2, 3 + i]} for i in range(6)
    ]
    ResponseShards(data, rows_per_shard=2).append(rows[:5])  # shards of 2, 2 and 1 rows
    with open(data / "shard-00002.jsonl", "a") as f:
        f.write('{"prompt_id": "sharegpt/5", "mo')  # the generator half-way through a row
    (data / "runs.json").write_text(json.dumps([{"command": "blockpilot regenerate ..."}]))
    env = {"DATA": str(data), "ROWS": str(rows_dir), "PYTHON": sys.executable}
    out = run(["bash", "examples/snapshot_data.sh"], env=env)
    names = ["runs.json", "shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"]
    assert sorted(p.name for p in rows_dir.iterdir()) == names
    assert "shard-00002.jsonl: 1 rows" in out
    first = (rows_dir / "shard-00000.jsonl.gz").read_bytes()
    merge = [str(Path(sys.executable).parent / "blockpilot"), "data-merge", str(rows_dir), "--into", str(restored)]
    run(merge)
    assert read_responses(restored) == rows[:5]

    ResponseShards(data, rows_per_shard=2).append(rows[5:])  # cuts the torn line, completes the open shard
    out = run(["bash", "examples/snapshot_data.sh"], env=env)
    assert "shard-00002.jsonl: 2 rows" in out and "shard-00000" not in out and "shard-00001" not in out
    assert (rows_dir / "shard-00000.jsonl.gz").read_bytes() == first
    run(merge)
    assert read_responses(restored) == read_responses(data) == rows
    assert json.loads((restored / "runs.json").read_text()) == [{"command": "blockpilot regenerate ..."}]

    fresh = tmp_path / "fresh"  # a new machine's cache, not restored before generating
    ResponseShards(fresh, rows_per_shard=2).append(rows[:1])
    failed = subprocess.run(
        ["bash", "examples/snapshot_data.sh"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "DATA": str(fresh)},
        cwd=EXAMPLES.parent,
    )
    assert failed.returncode != 0 and "data-merge" in failed.stderr and "holds 1 rows that" in failed.stderr
    assert (rows_dir / "shard-00000.jsonl.gz").read_bytes() == first


def test_snapshot_training_keeps_the_newest_checkpoint_of_unfinished_drafters_and_the_study_resumes_from_it(tmp_path):
    # Hours of training outlive the cache directory: the newest checkpoint of a drafter still training goes into its
    # record (an older one leaves it), a finished drafter's weights replace it, and a new machine's study copies it
    # back.
    runs, results = tmp_path / "runs", tmp_path / "results"
    for name, steps in (("curve-2000000", (50, 100)), ("ablations-500000/gamma-4", (50,)), ("curve-1000", (50,))):
        for step in steps:
            (runs / name / "checkpoints" / f"step-{step}").mkdir(parents=True)
            (runs / name / "checkpoints" / f"step-{step}" / "model.safetensors").write_text(f"{name} {step}")
    for name in ("config.json", "model.safetensors"):
        (runs / "curve-1000" / name).write_text(f"finished {name}")
    (runs / "curve-500" / "checkpoints").mkdir(parents=True)  # finished before any checkpoint was kept: labels only
    (runs / "curve-500" / "model.safetensors").write_text("finished")
    (results / "study_runs" / "curve-1000" / "checkpoint" / "step-50").mkdir(parents=True)
    env = {"RUNS": str(runs), "RESULTS": str(results)}
    out = run(["bash", "examples/snapshot_training.sh"], env=env)
    kept = results / "study_runs" / "curve-2000000" / "checkpoint"
    assert [p.name for p in kept.iterdir()] == ["step-100"]
    assert (kept / "step-100" / "model.safetensors").read_text() == "curve-2000000 100"
    assert [p.name for p in (results / "study_runs" / "ablations-500000" / "gamma-4" / "checkpoint").iterdir()] == [
        "step-50"
    ]
    assert not (results / "study_runs" / "curve-1000" / "checkpoint").exists() and "curve-1000: finished" in out
    finished = results / "study_runs" / "curve-1000"
    assert sorted(p.name for p in finished.iterdir()) == ["config.json", "model.safetensors"]
    assert (finished / "model.safetensors").read_text() == "finished model.safetensors"
    assert not (results / "study_runs" / "curve-500").exists()
    (runs / "curve-2000000" / "checkpoints" / "step-150").mkdir()
    assert "step-150 kept" in run(["bash", "examples/snapshot_training.sh"], env=env)
    assert [p.name for p in kept.iterdir()] == ["step-150"]

    # A new machine: no runs; the study copies the committed checkpoint back before training resumes from it.
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard-00000.jsonl").write_text(
        json.dumps({"prompt_id": "sharegpt/0", "mode": "greedy", "prompt_len": 2, "input_ids": [1, 2, 3, 4, 5, 6]})
        + "\n"
    )
    fake = tmp_path / "blockpilot"  # stands in for training: records what the run directory holds, then fails
    fake.write_text(f'#!/bin/sh\nls {tmp_path}/new-runs/curve-4/checkpoints > {tmp_path}/seen; exit 3\n')
    fake.chmod(0o755)
    study = {"DATA": str(data), "RUNS": str(tmp_path / "new-runs"), "RESULTS": str(results), "BLOCKPILOT": str(fake)}
    (results / "study_runs" / "curve-4" / "checkpoint").mkdir(parents=True)
    (kept / "step-150").rename(results / "study_runs" / "curve-4" / "checkpoint" / "step-150")
    failed = subprocess.run(
        ["bash", "examples/drafter_study.sh"],
        capture_output=True,
        text=True,
        env={**os.environ, **study, "PYTHON": sys.executable, "STUDY": "curve", "POINTS": "4"},
        cwd=EXAMPLES.parent,
    )
    assert failed.returncode == 3, failed.stderr
    assert "curve-4: resuming from the committed" in failed.stdout
    assert (tmp_path / "seen").read_text().split() == ["step-150"]


def humaneval_labels(tau: float) -> str:
    """`collect-labels` rows for all 164 HumanEval problems, each of mean acceptance `tau` at B = 4 and 16."""
    row = {"tau": {"4": tau, "16": tau}, "steps": {"4": 10, "16": 10}, "new_tokens": 11}
    return "\n".join(json.dumps({**row, "prompt_id": f"HumanEval/{i}"}) for i in range(164)) + "\n"


def test_learning_curve_keeps_committed_points_whose_runs_are_gone(tmp_path):
    # A new machine starts without the study's runs: re-plotting must not drop the points only the committed JSON
    # still holds, and a point made again replaces its committed numbers.
    runs, out = tmp_path / "runs", tmp_path / "curve"
    for tokens, tau in ((1000, 1.2), (2000, 1.4)):
        (runs / f"curve-{tokens}").mkdir(parents=True)
        (runs / f"curve-{tokens}" / "humaneval_labels.jsonl").write_text(humaneval_labels(tau))
        (runs / f"curve-{tokens}" / "training_log.json").write_text(json.dumps({"args": {"epochs": 3}, "steps": 5}))
    (runs / "shipped_humaneval_b4-16.jsonl").write_text(humaneval_labels(1.5))
    plot = [sys.executable, "results/current/learning_curve/plot.py", str(runs), str(out)]
    run(plot)
    (runs / "curve-1000" / "humaneval_labels.jsonl").unlink()  # gone with the old machine
    (runs / "shipped_humaneval_b4-16.jsonl").unlink()
    (runs / "curve-2000" / "humaneval_labels.jsonl").write_text(humaneval_labels(1.3))  # made again
    run(plot)
    result = json.loads((out / "learning_curve.json").read_text())
    assert [p["training_tokens"] for p in result["points"]] == [1000, 2000]
    assert [p["tau_b16"] for p in result["points"]] == pytest.approx([1.2, 1.3])
    assert result["shipped"]["tau_b16"] == pytest.approx(1.5) and (out / "learning_curve.png").is_file()


def test_run_at_scale_draws_checkpoints_and_says_what_tau_3_takes_only_once_finished(tmp_path):
    # No estimate before the run has finished. The finished point is carried along the baseline's slope (two doublings
    # of rows seen at 0.25 a doubling from tau 2.5) and, once two checkpoints are labelled, along theirs.
    runs, out = tmp_path / "study_runs", tmp_path / "curve"
    for tokens, rows_seen, tau in ((1000, 160, 1.2), (2000, 320, 1.45)):
        (runs / f"curve-{tokens}").mkdir(parents=True)
        (runs / f"curve-{tokens}" / "humaneval_labels.jsonl").write_text(humaneval_labels(tau))
        log = {"args": {"epochs": 3, "batch_size": 16}, "steps": rows_seen // 16}
        (runs / f"curve-{tokens}" / "training_log.json").write_text(json.dumps(log))
    record = runs / "curve-batch_size_8-2000"
    (record / "checkpoint_labels").mkdir(parents=True)
    (record / "checkpoint_labels" / "step-50.jsonl").write_text(humaneval_labels(1.9))
    (record / "checkpoint_labels" / "step-75.jsonl").write_text(humaneval_labels(2.0)[:-200])  # still labelling
    history = [{"step": 1, "lr": 1e-5}, {"step": 40, "lr": 5e-4}, {"step": 60, "lr": 3e-4}]
    log = {"args": {"batch_size": 8}, "steps": 100, "seconds": 360.0, "history": history}
    (record / "training_log.json").write_text(json.dumps(log))
    script = [sys.executable, "results/current/learning_curve/run_at_scale.py", str(record), str(out)]
    run(script)
    result = json.loads((out / "run_at_scale.json").read_text())
    assert [(p["step"], p["rows_seen"], p["lr"]) for p in result["checkpoints"]] == [(50, 400, 5e-4)]
    assert [p["rows_seen"] for p in result["baseline_curve"]] == [160, 320] and "tau_3_estimate" not in result

    (record / "humaneval_labels.jsonl").write_text(humaneval_labels(2.5))
    run(script)
    result = json.loads((out / "run_at_scale.json").read_text())
    finished = result["checkpoints"][-1]
    assert (finished["step"], finished["rows_seen"], finished["finished"]) == (100, 800, True)
    assert finished["tau_b16"] == pytest.approx(2.5)
    estimate = result["tau_3_estimate"]
    baseline = estimate["along"]["baseline"]
    assert not estimate["reached"] and baseline["slope_per_doubling"] == pytest.approx(0.25)
    assert baseline["rows_seen"] == 3200 and baseline["steps"] == 400 and baseline["hours"] == pytest.approx(0.4)
    assert "checkpoints" not in estimate["along"]  # one labelled checkpoint: no slope of its own
    assert (out / "run_at_scale.png").is_file()

    (record / "checkpoint_labels" / "step-25.jsonl").write_text(humaneval_labels(1.6))  # 200 rows seen: +0.3
    run(script)
    checkpoints = json.loads((out / "run_at_scale.json").read_text())["tau_3_estimate"]["along"]["checkpoints"]
    assert checkpoints["slope_per_doubling"] == pytest.approx(0.3)
    assert checkpoints["steps"] == round(100 * 2 ** (5 / 3))  # 5/3 doublings of the finished run's 100 steps


def test_study_of_another_recipe_draws_its_run_beside_the_baseline_curve_without_replacing_it(tmp_path):
    # A tagged curve (CURVE_OPTIONS) is one run of another recipe: its end redraws run_at_scale.json, and the baseline's
    # learning_curve.json stays what it was (it was once overwritten by the tagged series alone).
    results = tmp_path / "results"
    record = results / "study_runs" / "curve-batch_size_8-2000"
    record.mkdir(parents=True)
    (record / "humaneval_labels.jsonl").write_text(humaneval_labels(2.5))
    log = {"args": {"batch_size": 8}, "steps": 100, "seconds": 360.0, "history": [{"step": 1, "lr": 1e-5}]}
    (record / "training_log.json").write_text(json.dumps(log))
    curve = results / "learning_curve"
    curve.mkdir()
    (curve / "learning_curve.json").write_text('{"runs": "curve-N"}\n')
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard-00000.jsonl").write_text(
        json.dumps({"prompt_id": "sharegpt/0", "mode": "greedy", "prompt_len": 2, "input_ids": [1, 2, 3, 4]}) + "\n"
    )
    env = {"DATA": str(data), "RUNS": str(tmp_path / "runs"), "RESULTS": str(results), "PYTHON": sys.executable}
    env |= {"STUDY": "curve", "POINTS": "2000", "CURVE_OPTIONS": "--batch-size 8", "BLOCKPILOT": "false"}
    out = run(["bash", "examples/drafter_study.sh"], env=env)
    assert "labelled on all 164 problems before" in out
    assert (curve / "learning_curve.json").read_text() == '{"runs": "curve-N"}\n'
    finished = json.loads((curve / "run_at_scale.json").read_text())["checkpoints"][-1]
    assert finished["finished"] and finished["tau_b16"] == pytest.approx(2.5)


def test_study_trains_a_finished_drafter_on_over_the_rows_after_its_own_without_a_feature_store(tmp_path):
    # STUDY=on: the rows after those the drafter read must exist in the data (or the run waits), and they are read
    # once, so no store is made. What train-drafter does with these options is tests/test_training.py's; here the
    # study's command line is recorded by a stand-in for the blockpilot command.
    data = tmp_path / "data"
    data.mkdir()
    row = {"prompt_id": "sharegpt/0", "mode": "greedy", "prompt_len": 2, "input_ids": [1, 2, 3, 4]}
    (data / "shard-00000.jsonl").write_text((json.dumps(row) + "\n") * 3)  # 6 response tokens
    calls = tmp_path / "calls.txt"
    blockpilot = tmp_path / "blockpilot"
    blockpilot.write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
        'while [ $# -gt 0 ]; do [ "$1" != --out ] || { mkdir -p "${2%/*}"; : > "$2"; }; shift; done\n'  # labels
    )
    blockpilot.chmod(0o755)
    env = {"DATA": str(data), "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")}
    env |= {"PYTHON": sys.executable, "BLOCKPILOT": str(blockpilot), "STUDY": "on", "ON_FROM": "shipped/drafter"}
    out = run(["bash", "examples/drafter_study.sh"], env={**env, "ON_SKIP": "2", "ON_TOKENS": "6"})
    assert "on-2-6: needs 8 response tokens, the data holds 6; left for a later run" in out
    assert not calls.exists()

    run(["bash", "examples/drafter_study.sh"], env={**env, "ON_SKIP": "2", "ON_TOKENS": "4"})
    train, label = calls.read_text().splitlines()
    assert train.startswith("train-drafter") and label.startswith("collect-labels")
    for option in ("--init-drafter shipped/drafter", "--skip-train-tokens 2", "--max-train-tokens 4", "--epochs 1"):
        assert option in train
    assert "--feature-store" not in train and f"--output-dir {tmp_path}/runs/on-2-4 " in train
    assert (tmp_path / "results" / "study_runs" / "on-2-4" / "humaneval_labels.jsonl").is_file()


@pytest.mark.long
def test_ship_drafter_archives_the_old_default_and_measures_everything_again_with_the_new(tiny_pair, tmp_path):
    # Shipping takes hours (labels, step costs, policy, benches) and spans sessions: every step must run on what the
    # step before it left, a rerun must resume rather than archive or measure twice, and what the old drafter's
    # numbers were made of must land in the archive, not be overwritten.
    target, drafter = tiny_pair
    repo = EXAMPLES.parent
    artifacts, results, labels = tmp_path / "artifacts", tmp_path / "results", tmp_path / "results/current/labels"
    shutil.copytree(repo / "blockpilot_hf/artifacts", artifacts)
    labels.mkdir(parents=True)
    old_labels = sorted(p.name for p in (repo / "results/current/labels").glob("*_b1-16_*.jsonl"))
    for name in old_labels + ["policy_prompts.jsonl"]:
        shutil.copy(repo / "results/current/labels" / name, labels / name)
    old_costs = sorted(p.name for p in (repo / "results/current/step_costs_by_machine").iterdir())
    shutil.copytree(repo / "results/current/step_costs_by_machine", results / "current/step_costs_by_machine")
    env = {
        "ARTIFACTS": str(artifacts), "RESULTS": str(results), "POLICY_OUT": str(tmp_path / "policy"),
        "POLICY_CONTINUATIONS": str(tmp_path / "policy_answers.jsonl"),
        "HUMANEVAL_CONTINUATIONS": str(tmp_path / "humaneval_answers.jsonl"),
        "TARGET": target, "BLOCK_SIZES": "2,3,4", "MAX_NEW_TOKENS": "8", "LIMIT": "4", "REPEATS": "1",
        "RUNS": "b1 4 1 plain,plain_packed,fixed,fixed_copy,policy 1,4\nb2 4 2 plain,fixed,policy 1,2",
        "PYTHON": sys.executable, "BLOCKPILOT": str(Path(sys.executable).parent / "blockpilot"),
    }
    archive = results / "archive/drafter_old"
    archive.mkdir(parents=True)
    (archive / "model_card.md").write_text("an earlier drafter's card")  # the name of an archive made before
    refused = subprocess.run(
        ["bash", "examples/ship_drafter.sh", drafter, "drafter_old", "bench_new"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=repo,
    )
    assert refused.returncode == 2 and "holds another drafter's cards: name another archive" in refused.stderr
    assert (labels / old_labels[0]).is_file()  # nothing moved
    shutil.rmtree(archive)
    out = run(["bash", "examples/ship_drafter.sh", drafter, "drafter_old", "bench_new"], env=env)

    assert sorted(p.name for p in (archive / "labels").iterdir()) == old_labels
    assert sorted(p.name for p in (archive / "step_costs_by_machine").iterdir()) == old_costs
    assert (archive / "model_card.md").read_text() == (repo / "model_cards/smollm2-135m-dflash-b16.md").read_text()
    shipped = artifacts / "smollm2-135m-dflash-b16"
    new, trained = load_file(shipped / "model.safetensors"), load_file(Path(drafter) / "model.safetensors")
    assert new.keys() == trained.keys() and all(torch.equal(new[k], trained[k].to(torch.bfloat16)) for k in new)

    here = machine_of("cpu")
    assert sorted(p.name for p in (results / "current/step_costs_by_machine").iterdir()) == sorted(
        [machine_file_name(here), machine_file_name(here).replace(".json", ".breakdown.json")]
    )
    identities = set()
    for name in old_labels:
        rows = [json.loads(line) for line in (labels / name).read_text().splitlines()]
        assert len(rows) == 4 and all(set(row["tau"]) == {"2", "3", "4"} for row in rows)
        identities |= {row["drafter"] for row in rows}
    old_identity = json.loads((archive / "labels" / old_labels[0]).read_text().splitlines()[0])["drafter"]
    assert len(identities) == 1 and old_identity not in identities

    policy = json.loads((artifacts / "smollm2-135m-blockpilot/config.json").read_text())
    assert policy["candidate_block_sizes"] == [2, 3, 4] and policy["step_costs_machine"] == here
    assert policy["drafter_name_or_path"] == "smollm2-135m-dflash-b16" and policy["step_costs_by_machine"] == {}
    bench = results / "current/bench_new"
    for tag in ("b1_t0", "b2_t0_batch2"):
        summary = json.loads((bench / f"results_{tag}.json").read_text())["summary"]
        assert {label for label in summary} >= {"plain", "fixed=2" if "b2" in tag else "fixed=4+copy=5", "policy"}
        assert all(row["identical_to_plain"] == 1.0 for label, row in summary.items() if label != "plain")
    assert (bench / "results_b1_t1.json").is_file() and (bench / "results_b2_t1_batch2.json").is_file()
    assert "== For the model cards ==" in out and "humaneval_b1-16_copy5.jsonl (4 prompts) tau: B=2" in out

    rerun = run(["bash", "examples/ship_drafter.sh", drafter, "drafter_old", "bench_new"], env=env)
    assert f"shipped {drafter} into" in out and f"shipped {drafter} into" not in rerun
    assert "b1_t0: measured before" in rerun and "b2_t1: measured before" in rerun
    assert [p.name for p in (results / "archive").iterdir()] == ["drafter_old"]


def test_drafter_study_labels_only_checkpoints_that_load_as_drafters_and_not_twice(tmp_path):
    # STUDY=checkpoints runs beside a training of many sessions: a checkpoint still being saved (its config.json is
    # written last) must not be loaded, a finished drafter is left to its own labels, and a checkpoint whose labels
    # the record holds is not labelled again.
    runs, results = tmp_path / "runs", tmp_path / "results"
    (runs / "finished" / "checkpoints" / "step-5").mkdir(parents=True)
    (runs / "finished" / "model.safetensors").touch()
    (runs / "saving" / "checkpoints" / "step-50").mkdir(parents=True)
    (runs / "saving" / "checkpoints" / "step-50" / "model.safetensors").touch()
    for step in (100, 150):
        (runs / "seen" / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (runs / "seen" / "checkpoints" / f"step-{step}" / "config.json").touch()
    (results / "study_runs" / "seen" / "checkpoint_labels").mkdir(parents=True)
    (results / "study_runs" / "seen" / "checkpoint_labels" / "step-150.jsonl").touch()
    env = {"RUNS": str(runs), "RESULTS": str(results), "STUDY": "checkpoints", "PYTHON": sys.executable}
    out = run(["bash", "examples/drafter_study.sh"], env=env)
    assert out.splitlines() == ["saving: no checkpoint that loads as a drafter yet", "seen: step-150 labelled before"]

    # A run trained on from a finished drafter (STUDY=on) is labelled too, but never drawn over the run at scale's
    # run_at_scale.json / .png (which draw a run from its first step).
    checkpoint = runs / "on-2-4" / "checkpoints" / "step-50"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "training_log.json"):
        (checkpoint / name).touch()
    blockpilot = tmp_path / "blockpilot"  # stands in for collect-labels: writes its --out file
    blockpilot.write_text('#!/usr/bin/env bash\nwhile [ $# -gt 0 ]; do [ "$1" != --out ] || : > "$2"; shift; done\n')
    blockpilot.chmod(0o755)
    out = run(["bash", "examples/drafter_study.sh"], env={**env, "BLOCKPILOT": str(blockpilot)})
    assert "on-2-4: step-50 labelled into" in out
    assert (results / "study_runs" / "on-2-4" / "checkpoint_labels" / "step-50.jsonl").is_file()
    assert not (results / "learning_curve").exists()
