"""A drafter's draft vocabulary (`DFlashDrafter.set_draft_vocabulary`): it proposes only those target tokens, scored
with just their rows of the target's LM head; outputs stay the target's own."""

import json

import pytest
import torch

from blockpilot_hf import DFlashDrafter, cli
from blockpilot_hf.modeling_drafter import draft_head, greedy_proposals
from blockpilot_hf.training.data import frequent_token_ids
from helpers.decoding import workspaces
from helpers.models import VOCAB, make_drafter, make_prompt, make_target, ragged_batch
from helpers.oracle import make_oracle

N_NEW = 24
MASK = VOCAB - 1  # `make_drafter`'s mask token


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=7)


def test_round_trip_and_head(tmp_path, target):
    drafter = make_drafter(target)
    token_ids = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(0))[:40]
    drafter.set_draft_vocabulary(token_ids)
    drafter.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 40
    loaded = DFlashDrafter.from_pretrained(tmp_path)
    assert torch.equal(loaded.draft_token_ids, token_ids)

    head = draft_head(target, loaded)
    full = target.get_output_embeddings()
    assert head is not full and head.weight.shape == (40, full.weight.shape[1])
    torch.testing.assert_close(head.weight, full.weight[token_ids], rtol=0, atol=0)
    hidden = torch.randn(3, 5, full.weight.shape[1])
    with torch.no_grad():
        expected = token_ids[full(hidden)[..., token_ids].argmax(-1)]  # the best token of the vocabulary, as target id
        assert torch.equal(greedy_proposals(head, hidden), expected)

    loaded.set_draft_vocabulary(None)  # back to the whole vocabulary: the target's own head
    assert loaded.config.draft_vocab_size is None and draft_head(target, loaded) is full


@pytest.mark.parametrize(
    "token_ids, problem",
    [([], "empty"), ([3, 3, 5], "repeat"), ([1, VOCAB], r"lie in \[0, 96\)"), ([-1, 2], "lie in"), ([4, MASK], "mask token")],
)
def test_invalid_vocabularies_are_refused(target, token_ids, problem):
    drafter = make_drafter(target)
    with pytest.raises(ValueError, match=f"Invalid draft vocabulary: .*{problem}.*blockpilot draft-vocab"):
        drafter.set_draft_vocabulary(token_ids)
    assert drafter.config.draft_vocab_size is None


def test_a_checkpoint_without_its_vocabulary_is_refused(tmp_path, target):
    drafter = make_drafter(target)
    drafter.config.draft_vocab_size = 10  # config says there is a vocabulary, the weights have none
    drafter.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its config.*draft_token_ids"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_decoding_stays_lossless_and_proposes_only_the_vocabulary(target):
    """An oracle drafter restricted to a vocabulary that lacks half the tokens of the reference continuation: those
    proposals fail and the target's own tokens are committed instead, for a ragged batch."""
    ids, mask = ragged_batch(seed=31)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
    plain = target.generate(ids, **kwargs).sequences
    oracle = make_oracle(target, ids, N_NEW, block_size=4, attention_mask=mask)
    full = target.generate(ids, assistant_model=oracle, block_policy=4, **kwargs)
    assert torch.equal(full.sequences, plain)

    used = sorted(set(plain[:, ids.shape[1]:].flatten().tolist()))
    dropped = set(used[::2])
    oracle.set_draft_vocabulary([t for t in range(VOCAB - 1) if t not in dropped])
    restricted = target.generate(ids, assistant_model=oracle, block_policy=4, **kwargs)
    assert torch.equal(restricted.sequences, plain)
    full_accepted = sum(map(sum, full.acceptance_lengths))
    steps = lambda out: sum(map(len, out.acceptance_lengths))  # noqa: E731
    assert steps(restricted) > steps(full)  # fewer tokens per step: the dropped tokens were never proposed
    assert full_accepted == sum(map(sum, restricted.acceptance_lengths))
    heads = [w.draft_head for w in workspaces(target) if w.drafter is oracle]
    assert any(getattr(h, "draft_token_ids", None) is not None and h.weight.shape[0] == VOCAB - 1 - len(dropped) for h in heads)


def test_frequent_token_ids():
    rows = [
        {"prompt_len": 2, "input_ids": [9, 9, 5, 5, 5, 7, 7, 3]},
        {"prompt_len": 1, "input_ids": [9, 7, 3, 8]},
    ]
    # responses: 5 x3, 7 x3, 3 x2, 8 x1 (prompt tokens never count); ties -> the smaller id
    assert frequent_token_ids(rows, 10) == [5, 7, 3, 8]
    assert frequent_token_ids(rows, 2) == [5, 7]
    assert frequent_token_ids(rows, 3, exclude={7}) == [5, 3, 8]
    with pytest.raises(ValueError, match="at least one token"):
        frequent_token_ids(rows, 0)
    with pytest.raises(ValueError, match="No response tokens"):
        frequent_token_ids([{"prompt_len": 2, "input_ids": [1, 2]}], 4)


def test_draft_vocab_command(tmp_path, target, capsys):
    drafter_dir, out = tmp_path / "drafter", tmp_path / "pruned"
    make_drafter(target).save_pretrained(drafter_dir)
    (drafter_dir / "README.md").write_text("card")
    gen = torch.Generator().manual_seed(3)
    rows = [{"prompt_len": 3, "input_ids": torch.randint(0, VOCAB, (20,), generator=gen).tolist()} for _ in range(30)]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["draft-vocab", "--drafter", str(drafter_dir), "--data", str(tmp_path / "responses.jsonl"), "--size", "16",
              "--output-dir", str(out)])
    assert "draft vocabulary of 16 tokens covers" in capsys.readouterr().out
    loaded = DFlashDrafter.from_pretrained(out)
    expected = frequent_token_ids(rows, 16, exclude={MASK})
    assert loaded.draft_token_ids.tolist() == expected and MASK not in expected
    assert (out / "README.md").read_text() == "card"
    ids = make_prompt(5, length=6)
    assert torch.equal(
        target.generate(ids, assistant_model=loaded, max_new_tokens=8, do_sample=False),
        target.generate(ids, max_new_tokens=8, do_sample=False),
    )
