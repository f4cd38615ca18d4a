"""Policy labels (`training/labels.py`): the teacher-forced replay must reproduce the real decoding loop exactly.

The drafter is trained (session fixture `trained_setup`) on its tiny target's own greedy outputs, so proposals are
often accepted and the replay's prefix-matching logic is actually exercised (each test asserts some step accepted
more than one token).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from blockpilot_hf.features import prefill_summary_features
from blockpilot_hf.training.data import read_jsonl
from blockpilot_hf.training.labels import collect_labels, mean_tau, replay_acceptance
from helpers.models import VOCAB, greedy_reference, make_prompt

BLOCK_SIZES = [2, 3, 4, 6]


def loop_steps(target, drafter, ids, block_size, **length):
    out = target.generate(
        ids, assistant_model=drafter, block_policy=block_size, do_sample=False, return_dict_in_generate=True, **length
    )
    return out.sequences, out.acceptance_lengths[0]


# seeds 100..115 are the training prompts of `trained_setup`; 900.. are prompts the drafter never saw
@pytest.mark.parametrize("prompt_seed", [100, 103, 107, 900, 901])
def test_replay_equals_the_decoding_loop(trained_setup, prompt_seed):
    target, drafter, _, _ = trained_setup
    ids = make_prompt(prompt_seed, length=6)
    all_steps = []
    for max_new_tokens in (24, 9, 2):  # 9 and 2: blocks shrink near max_length, and mid-block at max_length
        reference = greedy_reference(target, ids, max_new_tokens)
        replay = replay_acceptance(target, drafter, reference, ids.shape[1], BLOCK_SIZES, max_length=reference.shape[1])
        for block_size in BLOCK_SIZES:
            sequences, steps = loop_steps(target, drafter, ids, block_size, max_new_tokens=max_new_tokens)
            assert torch.equal(sequences, reference)
            assert replay.acceptance_lengths[block_size] == steps, (max_new_tokens, block_size)
            assert sum(steps) == max_new_tokens - 1  # the first new token comes from prefill
            all_steps += steps
    if prompt_seed < 900:
        assert max(all_steps) > 1, "the drafter never got a proposal accepted: the comparison would be vacuous"


@pytest.mark.parametrize("prompt_seed", [100, 107, 901])
def test_replay_with_copy_chain_equals_the_decoding_loop(trained_setup, prompt_seed):
    """The copy chain beside the drafter's (and alone, block size 1): the replay's steps are the loop's."""
    target, drafter, _, _ = trained_setup
    base = make_prompt(prompt_seed, length=6)
    ids = torch.cat([base, base], dim=1)  # a prompt that repeats itself, so copies are proposed from the start
    copied_more = False
    for max_new_tokens, copy_tokens in ((24, 4), (9, 3), (2, 4)):
        reference = greedy_reference(target, ids, max_new_tokens)
        replay = replay_acceptance(
            target, drafter, reference, ids.shape[1], BLOCK_SIZES, max_length=reference.shape[1], copy_tokens=copy_tokens
        )
        assert sorted(replay.copy_acceptance_lengths) == [1] + BLOCK_SIZES
        for block_size in [1] + BLOCK_SIZES:
            out = target.generate(
                ids, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=copy_tokens,
                do_sample=False, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
            )
            assert torch.equal(out.sequences, reference)
            steps = out.acceptance_lengths[0]
            assert replay.copy_acceptance_lengths[block_size] == steps, (max_new_tokens, block_size, copy_tokens)
            if block_size > 1 and max_new_tokens == 24:
                copied_more |= len(steps) < len(replay.acceptance_lengths[block_size])
    assert copied_more, "the copy chain never saved a step: the comparison would not exercise it"


@pytest.mark.parametrize("copy_tokens", [0, 3])
def test_sampled_replay_equals_the_sampling_loop(trained_setup, copy_tokens):
    """Sampling: given the tokens the loop committed, its steps are a function of them, so a replay that takes the
    sequence's own tokens as the target's picks gives exactly the loop's acceptance lengths; the argmax picks of the
    greedy replay do not."""
    target, drafter, _, _ = trained_setup
    matched_greedy_replay, accepted_more, compared = True, False, 0
    for prompt_seed in (100, 104, 901):
        base = make_prompt(prompt_seed, length=6)
        ids = torch.cat([base, base], dim=1) if copy_tokens else base
        for block_size, temperature in ((4, 0.7), (3, 0.4), (6, 1.0)):
            torch.manual_seed(prompt_seed + block_size)
            out = target.generate(
                ids, assistant_model=drafter, block_policy=block_size, prompt_lookup_num_tokens=copy_tokens or None,
                do_sample=True, temperature=temperature, max_new_tokens=20, return_dict_in_generate=True,
            )
            steps = out.acceptance_lengths[0]
            for sampled in (True, False):
                replay = replay_acceptance(
                    target, drafter, out.sequences, ids.shape[1], [block_size], copy_tokens=copy_tokens,
                    sampled=sampled, max_length=ids.shape[1] + 20,
                )
                replayed = (replay.copy_acceptance_lengths if copy_tokens else replay.acceptance_lengths)[block_size]
                if sampled:
                    assert replayed == steps, (prompt_seed, block_size, temperature)
                else:
                    matched_greedy_replay &= replayed == steps
            accepted_more |= max(steps) > 1
            compared += 1
    assert compared == 9 and accepted_more, "no sampled proposal was ever accepted: the comparison would be vacuous"
    assert not matched_greedy_replay, "argmax picks replayed every sampled run too: the test cannot tell them apart"


def test_replay_with_max_length_beyond_the_sequence_and_explicit_max_length(trained_setup):
    target, drafter, _, _ = trained_setup
    ids = make_prompt(101, length=6)
    reference = greedy_reference(target, ids, 15)
    # max_length=None means "the sequence ends at max_length": the same as passing its length.
    default = replay_acceptance(target, drafter, reference, 6, BLOCK_SIZES)
    explicit = replay_acceptance(target, drafter, reference, 6, BLOCK_SIZES, max_length=reference.shape[1])
    assert default.acceptance_lengths == explicit.acceptance_lengths
    for block_size in BLOCK_SIZES:
        _, steps = loop_steps(target, drafter, ids, block_size, max_length=reference.shape[1])
        assert default.acceptance_lengths[block_size] == steps


def test_replay_prefill_is_the_decoding_prefill(trained_setup):
    target, drafter, _, _ = trained_setup
    ids = make_prompt(102, length=6)
    reference = greedy_reference(target, ids, 10)
    replay = replay_acceptance(target, drafter, reference, 6, [4])
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    torch.testing.assert_close(replay.prefill.last_logits, out.logits[:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(replay.prefill.last_hidden_state, out.hidden_states[-1][:, -1], rtol=1e-4, atol=1e-5)
    assert replay.prefill.prompt_lengths.tolist() == [6]


class CharTokenizer:
    """Enough of a tokenizer for `collect_labels` on a VOCAB-96 target: no chat template, one id per character."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % (VOCAB - 2) for c in text]}


def test_collect_labels_rows(trained_setup, tmp_path):
    target, drafter, _, _ = trained_setup
    tokenizer = CharTokenizer()
    prompts = [{"prompt_id": f"c/{i}", "prompt": text} for i, text in enumerate(["hello", "a longer prompt", "why?"])]
    out, logits_dir = tmp_path / "labels.jsonl", tmp_path / "logits"
    sizes = [2, 3, 4, 5]
    written = collect_labels(target, drafter, tokenizer, prompts, out, sizes, max_new_tokens=16, logits_path=logits_dir,
                             batch_size=2)
    rows = read_jsonl(out)
    assert rows == written and sorted(r["prompt_id"] for r in rows) == ["c/0", "c/1", "c/2"]
    width = target.config.hidden_size + 4
    for row in rows:
        prompt = next(p["prompt"] for p in prompts if p["prompt_id"] == row["prompt_id"])
        assert row["prompt_len"] == len(prompt)
        assert row["new_tokens"] == 16  # no EOS on this target
        assert set(row["tau"]) == set(row["steps"]) == set(row["acceptance_histogram"]) == {str(b) for b in sizes}
        assert len(row["summary_features"]) == width
        for b in sizes:
            histogram = row["acceptance_histogram"][str(b)]
            assert sum(histogram.values()) == row["steps"][str(b)]
            assert row["tau"][str(b)] * row["steps"][str(b)] == pytest.approx(row["new_tokens"] - 1)
            assert all(1 <= int(k) <= b for k in histogram)
        # the labels are what the decoding loop measures on this prompt, at every block size
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        for b in sizes:
            _, steps = loop_steps(target, drafter, ids, b, max_new_tokens=16)
            assert row["tau"][str(b)] == pytest.approx(mean_tau(steps))
        # summary features and raw logits are the prefill's
        with torch.no_grad():
            logits = target(ids).logits[:, -1]
        saved = load_file(str(logits_dir / (row["prompt_id"].replace("/", "__") + ".safetensors")))["last_logits"]
        assert saved.shape == (VOCAB,)
        torch.testing.assert_close(saved, logits[0], rtol=1e-4, atol=1e-5)
    assert any(int(k) > 1 for row in rows for h in row["acceptance_histogram"].values() for k in h)

    # rerunning skips every labelled prompt
    before = out.read_text()
    assert collect_labels(target, drafter, tokenizer, prompts, out, sizes, max_new_tokens=16) == []
    assert out.read_text() == before


def test_collect_labels_refuses_to_resume_another_drafters_or_settings_file(trained_setup, tmp_path):
    from blockpilot_hf.training.labels import drafter_identity

    target, drafter, _, _ = trained_setup
    tokenizer = CharTokenizer()
    prompts = [{"prompt_id": f"r/{i}", "prompt": text} for i, text in enumerate(["hello", "why?"])]
    out = tmp_path / "labels.jsonl"
    collect_labels(target, drafter, tokenizer, prompts[:1], out, [2, 4], max_new_tokens=8)
    assert read_jsonl(out)[0]["drafter"] == drafter_identity(drafter)
    # the same drafter and settings resume: only the new prompt is labelled
    assert [r["prompt_id"] for r in collect_labels(target, drafter, tokenizer, prompts, out, [2, 4], 8)] == ["r/1"]
    before = out.read_text()
    other = copy.deepcopy(drafter)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert drafter_identity(other) != drafter_identity(drafter)
    with pytest.raises(ValueError, match="not of this drafter"):
        collect_labels(target, other, tokenizer, prompts, out, [2, 4], 8)
    with pytest.raises(ValueError, match=r"block sizes \[2, 4\] with copy_tokens=0, not \[2, 3\]"):
        collect_labels(target, drafter, tokenizer, prompts, out, [2, 3], 8)
    with pytest.raises(ValueError, match=r"copy_tokens=0, not \[2, 4\] with copy_tokens=3"):
        collect_labels(target, drafter, tokenizer, prompts, out, [2, 4], 8, copy_tokens=3)
    assert out.read_text() == before
    # a file from before labels named their drafter is refused too
    rows = read_jsonl(out)
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "drafter"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="a drafter it does not name"):
        collect_labels(target, drafter, tokenizer, prompts, out, [2, 4], 8)


def test_summary_feature_width_matches_the_policy_input(trained_setup):
    target, drafter, _, _ = trained_setup
    ids = make_prompt(104, length=6)
    replay = replay_acceptance(target, drafter, greedy_reference(target, ids, 6), 6, [3])
    assert prefill_summary_features(replay.prefill).shape == (1, target.config.hidden_size + 4)


def test_collect_labels_reuses_kept_continuations(trained_setup, tmp_path, monkeypatch):
    from blockpilot_hf.training import labels

    target, drafter, _, _ = trained_setup
    tokenizer = CharTokenizer()
    prompts = [{"prompt_id": f"k/{i}", "prompt": text} for i, text in enumerate(["hello", "a longer prompt", "why?"])]
    kept = tmp_path / "continuations.jsonl"
    sizes = [2, 4]
    first = collect_labels(target, drafter, tokenizer, prompts[:2], tmp_path / "a.jsonl", sizes, 16,
                           batch_size=2, continuations_path=kept)
    assert sorted(r["prompt_id"] for r in read_jsonl(kept)) == ["k/0", "k/1"]
    # A second drafter's labels (here the same drafter, another file): kept prompts are not generated again, the new
    # one is, and is kept too.
    generated = []
    real = labels.target_continuations
    monkeypatch.setattr(
        labels, "target_continuations", lambda t, tok, group, *a: generated.extend(group) or real(t, tok, group, *a)
    )
    again = collect_labels(target, drafter, tokenizer, prompts, tmp_path / "b.jsonl", sizes, 16,
                           batch_size=3, continuations_path=kept)
    assert [p["prompt_id"] for p in generated] == ["k/2"]
    assert [r["tau"] for r in again[:2]] == [r["tau"] for r in first]
    assert len(read_jsonl(kept)) == 3
    # What is kept is what the labels are made from: a shortened continuation gives fewer new tokens.
    rows = read_jsonl(kept)
    rows[0]["input_ids"] = rows[0]["input_ids"][:-6]
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (shortened,) = [r for r in collect_labels(target, drafter, tokenizer, prompts[:1], tmp_path / "c.jsonl", sizes,
                                              16, continuations_path=kept)]
    assert shortened["new_tokens"] == 10
    # Continuations of another target (or dtype) are refused, naming the fix.
    rows[0]["dtype"] = "bfloat16"
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="its own continuations file"):
        collect_labels(target, drafter, tokenizer, prompts, tmp_path / "d.jsonl", sizes, 16, continuations_path=kept)


def test_collect_labels_at_a_temperature(trained_setup, tmp_path):
    """Sampled labels: one seeded sample per prompt, kept beside the greedy continuations in one file, labelled by
    the sampled replay; a labels file of another temperature is refused."""
    target, drafter, _, _ = trained_setup
    tokenizer = CharTokenizer()
    prompts = [{"prompt_id": f"t/{i}", "prompt": text} for i, text in enumerate(["hello", "a longer prompt", "why?"])]
    kept, sizes = tmp_path / "continuations.jsonl", [2, 4]
    greedy = collect_labels(target, drafter, tokenizer, prompts, tmp_path / "greedy.jsonl", sizes, 16,
                            continuations_path=kept)
    sampled = collect_labels(target, drafter, tokenizer, prompts, tmp_path / "t07.jsonl", sizes, 16,
                             continuations_path=kept, temperature=0.7, copy_tokens=3)
    assert all("temperature" not in r for r in greedy) and all(r["temperature"] == 0.7 for r in sampled)
    rows = read_jsonl(kept)
    assert sorted((r["prompt_id"], r.get("temperature", 0.0)) for r in rows) == sorted(
        (p["prompt_id"], t) for p in prompts for t in (0.0, 0.7)
    )
    by_key = {(r["prompt_id"], r.get("temperature", 0.0)): r["input_ids"] for r in rows}
    assert any(by_key[p["prompt_id"], 0.0] != by_key[p["prompt_id"], 0.7] for p in prompts), "no sample differed"
    for row in sampled:
        sequence = torch.tensor([by_key[row["prompt_id"], 0.7]])
        replay = replay_acceptance(target, drafter, sequence, row["prompt_len"], sizes, copy_tokens=3, sampled=True,
                                   max_length=row["prompt_len"] + 16)
        assert row["tau"] == {str(b): mean_tau(s) for b, s in replay.acceptance_lengths.items()}
        assert row["tau_copy"] == {str(b): mean_tau(s) for b, s in replay.copy_acceptance_lengths.items()}
    # the samples are seeded by the prompts: a fresh run draws the same
    again = collect_labels(target, drafter, tokenizer, prompts, tmp_path / "again.jsonl", sizes, 16,
                           continuations_path=tmp_path / "fresh.jsonl", temperature=0.7, copy_tokens=3)
    assert [r["tau"] for r in again] == [r["tau"] for r in sampled]
    with pytest.raises(ValueError, match="labels at temperature 0.7, not 1.0"):
        collect_labels(target, drafter, tokenizer, prompts, tmp_path / "t07.jsonl", sizes, 16, temperature=1.0,
                       copy_tokens=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        collect_labels(target, drafter, tokenizer, prompts, tmp_path / "x.jsonl", sizes, 16, temperature=-1.0)
