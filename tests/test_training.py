"""Drafter training (`training/drafter.py`), response regeneration (`training/data.py`) and the CLI end to end.

Everything runs on tiny random targets: a VOCAB-96 Llama for training itself, and a SmolLM2-vocabulary Llama with the
real SmolLM2 tokenizer wherever a tokenizer (chat template, EOS) matters.
"""

import json

import pytest
import torch

from blockpilot_hf import DFlashDrafter
from blockpilot_hf import cli
from blockpilot_hf.decoding import DecodingWorkspace
from blockpilot_hf.features import context_features
from blockpilot_hf.layout import build_block_layout
from blockpilot_hf.training.data import (
    chat_prompt_ids,
    leading_rows,
    read_jsonl,
    read_responses,
    regenerate_responses,
    split_prompts,
)
from blockpilot_hf.training.drafter import collate_right_padded, drafter_loss, train_drafter
from helpers.models import VOCAB, make_smol_target, make_target
from helpers.smollm2 import REAL_LOOKING_PROMPTS, SMOL_EOS, SMOL_MASK, write_prompts_jsonl
from helpers.training import greedy_rows, tiny_training_args

# ----------------------------------------------------------------------------------------------- train_drafter


def test_training_lowers_the_loss_and_saves_the_drafter(trained_setup):
    target, drafter, rows, output_dir = trained_setup
    log = json.loads((output_dir / "training_log.json").read_text())
    assert log["steps"] == 100
    history = log["history"]
    assert history[0]["step"] == 1 and history[-1]["step"] == 100
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert history[-1]["tau"] > 1.5

    # The same batch, the same anchors: the trained drafter's loss is below a fresh one's.
    batch = collate_right_padded([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows[:8]])
    torch.manual_seed(0)
    fresh = DFlashDrafter.from_target(target, num_layers=1, block_size=4, mask_token_id=VOCAB - 1).eval()
    with torch.no_grad():
        fresh_loss, _ = drafter_loss(fresh, target, batch, 4, 16, torch.Generator().manual_seed(0))
        trained_loss, stats = drafter_loss(drafter, target, batch, 4, 16, torch.Generator().manual_seed(0))
    assert trained_loss < fresh_loss - 0.3
    assert stats["tau"] > 1.5

    # Saved: config + safetensors + log, and the saved drafter is the returned one.
    assert {"config.json", "model.safetensors", "training_log.json"} <= {p.name for p in output_dir.iterdir()}
    loaded = DFlashDrafter.from_pretrained(output_dir)
    assert loaded.config.block_size == 4 and loaded.config.mask_token_id == VOCAB - 1
    for name, tensor in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_training_resumes_from_the_latest_checkpoint(tmp_path, capsys):
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 8)
    # batch 4 over 8 rows: 2 steps per epoch, so the resume point (step 4) also tests the epoch bookkeeping.
    train_drafter(target, rows, tiny_training_args(tmp_path, max_steps=4, save_every_steps=2, log_every_steps=1, batch_size=4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]
    first = json.loads((tmp_path / "training_log.json").read_text())
    assert first["steps"] == 4 and [r["step"] for r in first["history"]] == [1, 2, 3, 4]
    # A checkpoint is a drafter: the one of the last step loads as the drafter the run saved at its end.
    final = DFlashDrafter.from_pretrained(tmp_path)
    checkpoint = DFlashDrafter.from_pretrained(tmp_path / "checkpoints" / "step-4")
    assert {**checkpoint.config.to_dict(), "_name_or_path": ""} == {**final.config.to_dict(), "_name_or_path": ""}
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(checkpoint.state_dict()[name], tensor, rtol=0, atol=0)
    capsys.readouterr()

    train_drafter(target, rows, tiny_training_args(tmp_path, max_steps=7, save_every_steps=2, log_every_steps=1, batch_size=4))
    assert "resumed from" in capsys.readouterr().out
    second = json.loads((tmp_path / "training_log.json").read_text())
    assert second["steps"] == 7
    # steps continue, nothing is redone, and the log and the seconds go on from the checkpoint's
    assert [r["step"] for r in second["history"]] == [1, 2, 3, 4, 5, 6, 7]
    assert second["history"][:4] == first["history"] and second["seconds"] > first["seconds"]
    # The newest checkpoint and one before it are kept, older ones deleted (each holds the optimizer's state).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_time_budget_stops_training(tmp_path):
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 8)
    args = tiny_training_args(tmp_path, max_steps=None, epochs=10**6, time_budget_s=0.3, log_every_steps=10**6)
    train_drafter(target, rows, args)
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert 1 <= log["steps"] < 10**6
    assert log["seconds"] < 30  # a step on this drafter takes milliseconds: the budget, not the epochs, ended the run
    assert (tmp_path / "model.safetensors").is_file()


def test_training_block_sizes_cycle_with_equal_block_tokens_per_step(tmp_path):
    """Several block layouts in one run: sizes cycle step by step, shorter blocks get proportionally more anchors, and
    the drafter learns every layout it saw (lower loss than a fresh drafter at each size)."""
    args = tiny_training_args(tmp_path, block_size=4, max_anchors=8, training_block_sizes=[2, 4], log_every_steps=1)
    assert [args.block_size_at(s) for s in range(4)] == [(2, 16), (4, 8), (2, 16), (4, 8)]
    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 16)
    drafter = train_drafter(target, rows, args).eval()
    history = json.loads((tmp_path / "training_log.json").read_text())["history"]
    assert [r["block_size"] for r in history[:4]] == [2, 4, 2, 4]
    batch = collate_right_padded([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows[:8]])
    torch.manual_seed(0)
    fresh = DFlashDrafter.from_target(target, num_layers=1, block_size=4, mask_token_id=VOCAB - 1).eval()
    for block_size in (2, 4):
        with torch.no_grad():
            fresh_loss, _ = drafter_loss(fresh, target, batch, block_size, 16, torch.Generator().manual_seed(0))
            trained_loss, _ = drafter_loss(drafter, target, batch, block_size, 16, torch.Generator().manual_seed(0))
        assert trained_loss < fresh_loss - 0.3, block_size


@pytest.mark.parametrize(
    "command, option",
    [
        (["train-drafter", "--data", "d.jsonl", "--output-dir", "out"], "--train-block-sizes"),
        (["collect-labels", "--out", "labels.jsonl"], "--block-sizes"),
        (["bench"], "--block-sizes"),
        (["bench"], "--batch-sizes"),
    ],
)
def test_cli_refuses_a_malformed_size_list(capsys, command, option):
    with pytest.raises(SystemExit):
        cli.main([*command, option, "4,x"])
    assert f"{option}: expected comma-separated integers such as 4,16,2, got '4,x'" in capsys.readouterr().err


def test_cli_refuses_block_sizes_beyond_the_block_before_generating_data(tmp_path, saved_smol_target):
    data = tmp_path / "responses.jsonl"
    with pytest.raises(ValueError, match=r"must lie in \[2, block_size=4\]"):
        cli.main([
            "train-drafter", "--target", str(saved_smol_target), "--data", str(data), "--output-dir", str(tmp_path),
            "--block-size", "4", "--train-block-sizes", "2,8",
        ])
    assert not data.exists()  # refused before any response was generated


def test_cli_generate_only_adds_responses_and_trains_nothing(tmp_path, saved_smol_target):
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", REAL_LOOKING_PROMPTS[:4], [f"g/{i}" for i in range(4)])
    data = tmp_path / "responses.jsonl"
    command = ["train-drafter", "--target", str(saved_smol_target), "--prompts", str(prompts), "--data", str(data)]
    cli.main([*command, "--generate-only", "--sampled-copies", "0", "--max-new-tokens", "4"])
    drafter_split = split_prompts([{"prompt_id": f"g/{i}"} for i in range(4)])["drafter"]
    assert sorted(r["prompt_id"] for r in read_jsonl(data)) == sorted(r["prompt_id"] for r in drafter_split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "responses.jsonl"]  # no drafter
    with pytest.raises(SystemExit, match="--output-dir is required"):
        cli.main([*command, "--skip-generation"])


@pytest.mark.parametrize("sizes", [[1, 4], [4, 8]])
def test_training_block_sizes_outside_the_configured_block_are_refused(tmp_path, sizes):
    with pytest.raises(ValueError, match=r"training_block_sizes .* must lie in \[2, block_size=4\]"):
        tiny_training_args(tmp_path, block_size=4, training_block_sizes=sizes)


def test_training_without_usable_rows_is_refused(tmp_path):
    target = make_target("llama", seed=0)
    rows = [{"prompt_id": "a", "mode": "greedy", "prompt_len": 5, "input_ids": [1, 2, 3, 4, 5, 6]}]  # 1 response token
    with pytest.raises(ValueError, match="at least 2 response tokens"):
        train_drafter(target, rows, tiny_training_args(tmp_path))


class _RecordingHead:
    """Stands in for the target's LM head inside the candidate generator and keeps the drafter's hidden states."""

    def __init__(self, head):
        self.head, self.inputs = head, []
        self.weight = head.weight

    def __call__(self, hidden):
        self.inputs.append(hidden)
        return self.head(hidden)


def test_padded_training_batch_matches_decoding_generator(trained_setup):
    """What `drafter_loss` builds (right-padded batch, real target features, many anchors per sequence, one masked
    forward) gives every block the hidden states the decoding loop's `DraftStep` computes when decoding reaches that
    anchor. (`test_layout.py` checks the unpadded mask on random features; this adds padding and the generator.)"""
    target, drafter, rows, _ = trained_setup
    block = 4
    seqs = [rows[0]["input_ids"][:22], rows[1]["input_ids"][:13]]
    batch = collate_right_padded([{"input_ids": s, "prompt_len": 6} for s in seqs])
    anchors = torch.tensor([[6, 11, 18], [6, 9, 11]])
    with torch.no_grad():
        out = target.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        features = context_features(out.hidden_states, drafter.config.target_layer_ids)
        positions = torch.arange(batch["input_ids"].shape[1]).expand(2, -1)
        layout = build_block_layout(
            torch.gather(batch["input_ids"], 1, anchors), anchors, block, drafter.config.mask_token_id,
            context_positions=positions, context_padding_mask=batch["attention_mask"],
        )
        many = drafter(
            noise_embeds=target.get_input_embeddings()(layout.input_ids), context_hidden_states=features,
            position_ids=torch.cat([positions, layout.position_ids], 1), attention_mask=layout.attention_mask,
        ).last_hidden_state.view(2, anchors.shape[1], block, -1)
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq])
            own = context_features(target(ids, output_hidden_states=True).hidden_states, drafter.config.target_layer_ids)
            for a, p in enumerate(anchors[i].tolist()):
                workspace = DecodingWorkspace(target, drafter, batch_size=1, capacity=64, use_graphs=False)
                workspace.reset(torch.ones(1, p, dtype=torch.bool))
                workspace.row_block_sizes.fill_(block)
                _, draft = workspace.steps(block)
                draft.lm_head = _RecordingHead(target.get_output_embeddings())
                draft.anchor_ids.fill_(seq[p])
                draft.anchor_positions.fill_(p)
                proposals = draft.run(own[:, :p], torch.arange(p)[None], torch.tensor(0))
                torch.testing.assert_close(many[i, a, 1:], draft.lm_head.inputs[0], rtol=1e-4, atol=1e-5)
                expected = target.get_output_embeddings()(many[i, a, 1:]).argmax(-1)
                assert proposals[0].tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------- regenerate_responses


def _prompts(n):
    return [{"prompt_id": f"r{i}", "prompt": REAL_LOOKING_PROMPTS[i]} for i in range(n)]


def test_regenerate_responses_writes_and_resumes(tmp_path, smol_tokenizer):
    target = make_smol_target(seed=0)
    out = tmp_path / "data.jsonl"
    prompts = _prompts(3)
    written = regenerate_responses(target, smol_tokenizer, prompts, out, max_new_tokens=6, batch_size=2, sampled_copies=1)
    rows = read_jsonl(out)
    assert rows == written
    assert sorted((r["prompt_id"], r["mode"]) for r in rows) == sorted(
        (p["prompt_id"], m) for p in prompts for m in ("greedy", "sample0")
    )
    by_id = {p["prompt_id"]: p["prompt"] for p in prompts}
    for row in rows:
        prompt_ids = chat_prompt_ids(smol_tokenizer, by_id[row["prompt_id"]])
        assert row["prompt_len"] == len(prompt_ids)
        assert row["input_ids"][: row["prompt_len"]] == prompt_ids
        assert 1 <= len(row["input_ids"]) - row["prompt_len"] <= 6
    # Greedy rows are the target's own greedy continuation of the (unpadded) chat prompt.
    greedy = next(r for r in rows if r["mode"] == "greedy" and r["prompt_id"] == "r0")
    ids = torch.tensor([greedy["input_ids"][: greedy["prompt_len"]]])
    reference = target.generate(ids, do_sample=False, max_new_tokens=6)[0].tolist()
    assert greedy["input_ids"] == reference[: len(greedy["input_ids"])]

    # A second call generates nothing and leaves the file as it was.
    before = out.read_text()
    assert regenerate_responses(target, smol_tokenizer, prompts, out, max_new_tokens=6, batch_size=2) == []
    assert out.read_text() == before


def test_regenerate_responses_time_budget_then_resume(tmp_path, smol_tokenizer):
    target = make_smol_target(seed=0)
    out = tmp_path / "data.jsonl"
    prompts = _prompts(3)
    first = regenerate_responses(target, smol_tokenizer, prompts, out, max_new_tokens=4, batch_size=1, sampled_copies=0,
                                 time_budget_s=0.0)
    assert len(first) == 1  # stopped after the batch that crossed the budget
    rest = regenerate_responses(target, smol_tokenizer, prompts, out, max_new_tokens=4, batch_size=1, sampled_copies=0)
    assert len(rest) == 2
    assert sorted(r["prompt_id"] for r in read_jsonl(out)) == ["r0", "r1", "r2"]


def test_regenerate_responses_stop_at_eos(tmp_path, smol_tokenizer):
    target = make_smol_target(seed=0)
    prompt = _prompts(1)
    plain = regenerate_responses(target, smol_tokenizer, prompt, tmp_path / "plain.jsonl", max_new_tokens=12, sampled_copies=0)
    response = plain[0]["input_ids"][plain[0]["prompt_len"] :]
    assert SMOL_EOS not in response and len(response) == 12
    # Make EOS win wherever the target would have said response[3] (its logit there is the max, hence positive).
    token = response[3]
    with torch.no_grad():
        target.lm_head.weight[SMOL_EOS] = 1.5 * target.lm_head.weight[token]
    rows = regenerate_responses(
        target, smol_tokenizer, _prompts(4), tmp_path / "eos.jsonl", max_new_tokens=12, batch_size=4, sampled_copies=0
    )
    assert len(rows) == 4
    stopped = 0
    for row in rows:
        response = row["input_ids"][row["prompt_len"] :]
        if SMOL_EOS in response:
            assert response.index(SMOL_EOS) == len(response) - 1  # EOS included, nothing after it
            stopped += 1
        else:
            assert len(response) == 12
    first = next(r for r in rows if r["prompt_id"] == "r0")
    assert first["input_ids"][first["prompt_len"] :][-1] == SMOL_EOS
    assert len(first["input_ids"]) - first["prompt_len"] <= 4
    assert stopped >= 1


def test_split_prompts_is_deterministic_and_disjoint():
    rows = [{"prompt_id": f"id-{i}", "prompt": "x"} for i in range(2000)]
    split = split_prompts(rows)
    again = split_prompts(list(reversed(rows)))
    ids = {k: {r["prompt_id"] for r in v} for k, v in split.items()}
    assert ids == {k: {r["prompt_id"] for r in v} for k, v in again.items()}
    assert not ids["drafter"] & ids["policy"]
    assert ids["drafter"] | ids["policy"] == {r["prompt_id"] for r in rows}
    assert 0.12 < len(ids["policy"]) / len(rows) < 0.18  # policy_fraction 0.15
    # A prompt's side depends on its id only, not on the other rows.
    assert {r["prompt_id"] for r in split_prompts(rows[:100])["policy"]} == {f"id-{i}" for i in range(100)} & ids["policy"]
    assert split_prompts(rows[:50], policy_fraction=0.0)["policy"] == []


# ----------------------------------------------------------------------------------------------- CLI end to end


def ids_by_split(n_each: int) -> tuple[list[str], list[str]]:
    """`n_each` prompt ids that `split_prompts` sends to the drafter side and `n_each` to the policy side."""
    rows = [{"prompt_id": f"prompt-{i}"} for i in range(400)]
    split = split_prompts(rows)
    drafter_ids = [r["prompt_id"] for r in split["drafter"][:n_each]]
    policy_ids = [r["prompt_id"] for r in split["policy"][:n_each]]
    assert len(drafter_ids) == len(policy_ids) == n_each
    return drafter_ids, policy_ids


def test_cli_trains_a_tiny_configuration_end_to_end(tmp_path, saved_smol_target, capsys):
    """train-drafter -> collect-labels -> train-policy -> generate, all through `blockpilot_hf.cli.main`."""
    target = str(saved_smol_target)
    drafter_ids, policy_ids = ids_by_split(4)
    # A user's own prompt files are used whole (only the built-in mixes are split): one file for each side.
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", REAL_LOOKING_PROMPTS[:4], drafter_ids)
    label_prompts = write_prompts_jsonl(tmp_path / "label_prompts.jsonl", REAL_LOOKING_PROMPTS[4:8], policy_ids)
    data, drafter_dir = tmp_path / "data" / "responses.jsonl", tmp_path / "drafter"
    cli.main([
        "train-drafter", "--target", target, "--prompts", str(prompts), "--num-prompts", "4", "--data", str(data),
        "--max-new-tokens", "8", "--output-dir", str(drafter_dir), "--num-layers", "1", "--block-size", "4",
        "--train-block-sizes", "2,4", "--batch-size", "2", "--max-steps", "3", "--log-every", "1",
    ])
    rows = read_jsonl(data)
    assert {r["prompt_id"] for r in rows} == set(drafter_ids)  # the policy side is never drafter training data
    assert len(rows) == 8  # greedy + one sampled copy each
    assert {"config.json", "model.safetensors", "training_log.json"} <= {p.name for p in drafter_dir.iterdir()}
    training_log = json.loads((drafter_dir / "training_log.json").read_text())
    assert training_log["steps"] == 3 and [r["block_size"] for r in training_log["history"]] == [2, 4, 2]
    drafter_config = json.loads((drafter_dir / "config.json").read_text())
    assert drafter_config["block_size"] == 4 and drafter_config["mask_token_id"] == SMOL_MASK

    labels = tmp_path / "labels.jsonl"
    cli.main([
        "collect-labels", "--target", target, "--drafter", str(drafter_dir), "--prompts", str(label_prompts),
        "--block-sizes", "2,3,4", "--max-new-tokens", "8", "--out", str(labels),
    ])
    label_rows = read_jsonl(labels)
    assert sorted(r["prompt_id"] for r in label_rows) == sorted(policy_ids)
    assert all(set(r["tau"]) == {"2", "3", "4"} for r in label_rows)

    policy_dir = tmp_path / "policy"
    cli.main([
        "train-policy", "--labels", str(labels), "--output-dir", str(policy_dir), "--target", target,
        "--drafter", str(drafter_dir), "--epochs", "5",
    ])
    assert {"config.json", "model.safetensors", "training_report.json", "observations.png"} <= {
        p.name for p in policy_dir.iterdir()
    }
    policy_config = json.loads((policy_dir / "config.json").read_text())
    assert policy_config["candidate_block_sizes"] == [2, 3, 4] and policy_config["drafter_block_size"] == 4
    capsys.readouterr()

    cli.main([
        "generate", "--target", target, "--drafter", str(drafter_dir), "--policy", str(policy_dir),
        "--max-new-tokens", "8", "What is a linked list?",
    ])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "mean tau" in out and "(policy)" in out


def test_cli_options_for_learning_curves_and_ablations(tmp_path, saved_smol_target):
    """--max-train-tokens trains on a leading sample of the data; --gamma and --target-layer-ids reach the recipe;
    collect-labels --continuations keeps the target's answers for the next drafter's labels."""
    target = str(saved_smol_target)
    drafter_ids, policy_ids = ids_by_split(4)
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", REAL_LOOKING_PROMPTS[:4], drafter_ids)
    data = tmp_path / "data"
    cli.main([
        "train-drafter", "--target", target, "--prompts", str(prompts), "--data", str(data), "--max-new-tokens", "8",
        "--generate-only",
    ])
    rows = read_responses(data)
    assert len(rows) == 8
    wanted = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows[:3])  # exactly the first three rows' tokens
    drafter_dir = tmp_path / "drafter"
    cli.main([
        "train-drafter", "--target", target, "--data", str(data), "--skip-generation", "--output-dir", str(drafter_dir),
        "--max-train-tokens", str(wanted), "--gamma", "3", "--target-layer-ids", "0,1", "--num-layers", "1",
        "--block-size", "4", "--batch-size", "1", "--epochs", "1",
    ])
    training_log = json.loads((drafter_dir / "training_log.json").read_text())
    assert training_log["steps"] == 3  # one epoch over three rows, batch 1
    assert training_log["args"]["gamma"] == 3.0
    assert json.loads((drafter_dir / "config.json").read_text())["target_layer_ids"] == [0, 1]
    assert leading_rows(rows, wanted + 1) == rows[:4] and leading_rows(rows, 10**9) == rows
    with pytest.raises(ValueError, match="at least 1"):
        leading_rows(rows, 0)

    # Training on from that drafter over the rows it has not read: the five after the first three.
    drafter_on = tmp_path / "drafter_on"
    cli.main([
        "train-drafter", "--target", target, "--data", str(data), "--skip-generation", "--output-dir", str(drafter_on),
        "--init-drafter", str(drafter_dir), "--skip-train-tokens", str(wanted), "--block-size", "4", "--batch-size",
        "1", "--epochs", "1",
    ])
    assert json.loads((drafter_on / "training_log.json").read_text())["steps"] == 5
    with pytest.raises(SystemExit, match="skips all 8 rows"):
        cli.main([
            "train-drafter", "--target", target, "--data", str(data), "--skip-generation", "--output-dir",
            str(tmp_path / "none"), "--skip-train-tokens", str(10**9),
        ])

    label_prompts = write_prompts_jsonl(tmp_path / "label_prompts.jsonl", REAL_LOOKING_PROMPTS[4:6], policy_ids[:2])
    kept = tmp_path / "continuations.jsonl"
    for name in ("a", "b"):
        cli.main([
            "collect-labels", "--target", target, "--drafter", str(drafter_dir), "--prompts", str(label_prompts),
            "--block-sizes", "2,4", "--max-new-tokens", "8", "--out", str(tmp_path / f"{name}.jsonl"),
            "--continuations", str(kept),
        ])
    assert len(read_jsonl(kept)) == 2
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")
