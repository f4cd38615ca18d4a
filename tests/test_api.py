"""The user-facing surface: `enable`, `custom_generate=speculative_generate`, streamers, scores, policies, errors."""

import pytest
import torch

import blockpilot_hf
from blockpilot_hf import BlockPilotGenerateOutput, BlockPolicy, DFlashDrafter, speculative_generate
from blockpilot_hf.features import PrefillRepresentation
from helpers.decoding import CollectingStreamer, FixedSizes
from helpers.models import VOCAB, greedy_reference, make_drafter, make_prompt, make_smol_target, make_target
from helpers.oracle import make_oracle

N_NEW = 20


@pytest.fixture(scope="module")
def setup():
    target = make_target("llama", seed=0)
    ids = make_prompt(0, length=6)
    return target, ids, make_drafter(target, block_size=4)


# ----------------------------------------------------------------------------------------------- streamers


@pytest.mark.parametrize("kind", ("random", "oracle"))
def test_streamer_gets_prompt_then_each_token(setup, kind):
    target, ids, drafter = setup
    if kind == "oracle":
        drafter = make_oracle(target, ids, N_NEW)
    expected_streamer = CollectingStreamer()
    expected = target.generate(ids, do_sample=False, max_new_tokens=N_NEW, streamer=expected_streamer)
    streamer = CollectingStreamer()
    out = target.generate(
        ids, assistant_model=drafter, block_policy=6, do_sample=False, max_new_tokens=N_NEW, streamer=streamer
    )
    assert torch.equal(out, expected)
    assert streamer.puts[0] == ids[0].tolist()
    assert all(len(p) == 1 for p in streamer.puts[1:])
    assert [p[0] for p in streamer.puts[1:]] == out[0, ids.shape[1] :].tolist()
    assert streamer.ended
    assert streamer.puts == expected_streamer.puts  # exactly what plain generate streams


def test_streamer_stops_at_eos_inside_an_accepted_block(setup):
    target, ids, _ = setup
    reference = greedy_reference(target, ids, N_NEW)[0, ids.shape[1] :].tolist()
    index = next(i for i in range(5, N_NEW) if reference[i] not in reference[:i])
    drafter = make_oracle(target, ids, N_NEW)
    streamer = CollectingStreamer()
    out = target.generate(
        ids, assistant_model=drafter, block_policy=16, do_sample=False, max_new_tokens=N_NEW,
        eos_token_id=reference[index], streamer=streamer,
    )
    assert out.shape[1] == ids.shape[1] + index + 1
    assert [p[0] for p in streamer.puts[1:]] == reference[: index + 1]  # nothing past EOS was streamed
    assert streamer.ended


def test_token_streamer_in_custom_generate_form():
    target = make_target("llama", seed=0, enable=False)
    ids = make_prompt(1)
    drafter = make_drafter(target)
    streamer = CollectingStreamer()
    out = target.generate(
        ids, custom_generate=speculative_generate, drafter=drafter, token_streamer=streamer, do_sample=False,
        max_new_tokens=N_NEW,
    )
    assert streamer.puts[0] == ids[0].tolist()
    assert [p[0] for p in streamer.puts[1:]] == out[0, ids.shape[1] :].tolist()
    assert streamer.ended


# ----------------------------------------------------------------------------------------------- enable


def test_enable_only_patches_that_instance():
    a = make_target("llama", seed=0, enable=False)
    b = make_target("llama", seed=0, enable=False)
    assert blockpilot_hf.enable(a) is a
    patched = a.generate
    assert blockpilot_hf.enable(a) is a and a.generate is patched  # idempotent, not wrapped twice
    assert "generate" in vars(a) and "generate" not in vars(b)
    assert type(a).generate is type(b).generate  # the class is untouched
    ids = make_prompt(2)
    # b knows nothing about block_policy: stock transformers rejects the unknown keyword
    with pytest.raises(ValueError):
        b.generate(ids, block_policy=4, max_new_tokens=3)


def test_enabled_generate_falls_through_without_drafter():
    target = make_target("llama", seed=0)
    stock = make_target("llama", seed=0, enable=False)
    ids = make_prompt(3)
    assert torch.equal(
        target.generate(ids, do_sample=False, max_new_tokens=N_NEW),
        stock.generate(ids, do_sample=False, max_new_tokens=N_NEW),
    )
    out = target.generate(ids, do_sample=False, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    assert not isinstance(out, BlockPilotGenerateOutput)
    with pytest.raises(ValueError, match="block_policy"):
        target.generate(ids, block_policy=4, max_new_tokens=3)


def test_enabled_generate_falls_through_for_ordinary_assistant():
    """A regular (autoregressive) assistant model takes stock assisted decoding, which is greedy-exact too."""
    target = make_target("llama", seed=0)
    assistant = make_target("llama", seed=5, num_layers=1, enable=False)
    ids = make_prompt(4)
    expected = target.generate(ids, do_sample=False, max_new_tokens=N_NEW)
    out = target.generate(ids, assistant_model=assistant, do_sample=False, max_new_tokens=N_NEW)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="block_policy"):
        target.generate(ids, assistant_model=assistant, block_policy=4, max_new_tokens=3)


def test_drafter_without_enable_names_the_fix():
    """Stock assisted decoding cannot use a DFlash drafter: the error says to call enable() instead."""
    stock = make_target("llama", seed=0, enable=False)
    drafter = make_drafter(stock, block_size=4)
    with pytest.raises(ValueError, match="enable"):
        stock.generate(make_prompt(1), assistant_model=drafter, max_new_tokens=3)


# ----------------------------------------------------------------------------------------------- errors


def test_batch_through_custom_generate(setup):
    """Batches need no `enable`: the custom_generate route gives plain batched greedy output too."""
    target, _, drafter = setup
    ids = make_prompt(0, batch=2)
    expected = target.generate(ids, do_sample=False, max_new_tokens=8)
    out = target.generate(ids, custom_generate=speculative_generate, drafter=drafter, do_sample=False, max_new_tokens=8)
    assert torch.equal(out, expected)


def test_unknown_decoding_backend_is_refused(setup):
    target, ids, drafter = setup
    with pytest.raises(ValueError, match="decoding_backend must be"):
        target.generate(ids, assistant_model=drafter, decoding_backend="fast", max_new_tokens=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA target"):
            target.generate(ids, assistant_model=drafter, decoding_backend="cuda_graphs", max_new_tokens=3)


@pytest.mark.parametrize("where", ("pipeline", "call"))
def test_text_generation_pipeline_takes_the_drafter(smol_tokenizer, where):
    """`pipeline("text-generation", ..., assistant_model=drafter)` (or the drafter in the call) decodes through the
    drafter and returns what the pipeline returns without it. At construction the pipeline compares the assistant's
    special tokens with the target's to decide whether they share a tokenizer: a drafter made by `from_target` has the
    target's."""
    from transformers import pipeline

    target = make_smol_target(seed=0)
    drafter = make_drafter(target, block_size=4)
    assert (drafter.config.bos_token_id, drafter.config.eos_token_id, drafter.config.pad_token_id) == (1, 2, 2)
    messages = [{"role": "user", "content": "Write a haiku about autumn rain."}]
    generate_kwargs = dict(max_new_tokens=12, do_sample=False)
    expected = pipeline("text-generation", model=target, tokenizer=smol_tokenizer)(messages, **generate_kwargs)
    calls = []
    drafter.register_forward_hook(lambda *_: calls.append(1))
    if where == "pipeline":
        pipe = pipeline("text-generation", model=target, tokenizer=smol_tokenizer, assistant_model=drafter)
        out = pipe(messages, **generate_kwargs)
    else:
        out = pipeline("text-generation", model=target, tokenizer=smol_tokenizer)(
            messages, assistant_model=drafter, **generate_kwargs
        )
    assert calls, "the drafter never ran"
    assert out == expected


def test_stop_strings_stop_where_plain_generate_stops(smol_tokenizer):
    """`stop_strings` with `tokenizer=`, in the call or in the generation config, as in plain `generate` (transformers
    drops `tokenizer` before calling a custom_generate callable; `enable`'s generate turns the strings into a
    criterion first)."""
    from transformers import GenerationConfig

    target = make_smol_target(seed=0)
    drafter = make_drafter(target, block_size=4)
    ids = smol_tokenizer("The quick brown fox", return_tensors="pt").input_ids
    free = target.generate(ids, max_new_tokens=30, do_sample=False)
    text = smol_tokenizer.decode(free[0, ids.shape[1] :])
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # ends the continuation about half way
    expected = target.generate(ids, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=smol_tokenizer)
    assert ids.shape[1] < expected.shape[1] < free.shape[1]
    out = target.generate(ids, assistant_model=drafter, max_new_tokens=30, do_sample=False, stop_strings=[stop],
                          tokenizer=smol_tokenizer)
    assert torch.equal(out, expected)
    config = GenerationConfig(max_new_tokens=30, do_sample=False, stop_strings=[stop], eos_token_id=2, pad_token_id=2)
    out = target.generate(ids, assistant_model=drafter, generation_config=config, tokenizer=smol_tokenizer)
    assert torch.equal(out, expected)
    assert config.stop_strings == [stop]  # the caller's config is left as it was
    with pytest.raises(ValueError, match="stop strings needs the model's tokenizer"):
        target.generate(ids, assistant_model=drafter, max_new_tokens=30, stop_strings=[stop])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_beams=2), r"Beam search \(`num_beams` > 1\) cannot be combined with a DFlash drafter"),
        (dict(num_beams=2, do_sample=True), r"Beam sample \(`num_beams` > 1\)"),
        (dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0), "Group beam search"),
        (dict(num_beams=2, force_words_ids=[[3]]), "Constrained beam search"),
        (dict(penalty_alpha=0.6, top_k=4), r"Contrastive search \(`penalty_alpha`\)"),
        (dict(dola_layers="low"), "DoLa decoding"),
        (dict(assistant_early_exit=2), "`assistant_early_exit` asks for another way of drafting"),
    ],
)
def test_other_decoding_strategies_are_refused(setup, settings, message):
    """Settings that select another strategy than greedy decoding or sampling (or another drafter) would otherwise be
    silently ignored: the call must fail and say which setting to drop."""
    target, ids, drafter = setup
    with pytest.raises(ValueError, match=message):
        target.generate(ids, assistant_model=drafter, max_new_tokens=3, **settings)


def test_num_return_sequences_samples_rows_per_prompt(setup):
    """As in plain `generate`: transformers repeats each prompt `num_return_sequences` times (prompt i gives rows
    i * n ... i * n + n - 1), the loop samples them as one batch, and greedy decoding refuses more than one."""
    target, ids, drafter = setup
    prompts = torch.cat([ids, ids.flip(1)])
    torch.manual_seed(0)
    out = target.generate(
        prompts, assistant_model=drafter, do_sample=True, num_return_sequences=3, max_new_tokens=6,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (6, ids.shape[1] + 6)
    assert torch.equal(out.sequences[:, : ids.shape[1]], prompts.repeat_interleave(3, dim=0))
    assert len(out.acceptance_lengths) == len(out.block_sizes) == 6
    with pytest.raises(ValueError, match="num_return_sequences"):
        target.generate(ids, assistant_model=drafter, num_return_sequences=2, max_new_tokens=3)


@pytest.mark.parametrize("size", (0, -1, 65, 1000))
def test_block_size_out_of_range(setup, size):
    target, ids, drafter = setup
    assert drafter.config.max_block_size == 64
    with pytest.raises(ValueError, match=rf"Block size {size} is out of range: it must be in \[1, 64\]"):
        target.generate(ids, assistant_model=drafter, block_policy=size, max_new_tokens=3)


def test_block_size_at_max_is_accepted(setup):
    target, ids, drafter = setup
    out = target.generate(ids, assistant_model=drafter, block_policy=64, do_sample=False, max_new_tokens=5)
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=5))


@pytest.mark.parametrize("bad", ("8", 2.0, True, [4]))
def test_block_policy_of_wrong_type(setup, bad):
    target, ids, drafter = setup
    with pytest.raises(TypeError, match="block_policy must be None, an int or an object"):
        target.generate(ids, assistant_model=drafter, block_policy=bad, max_new_tokens=3)


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(hidden_size=64), "hidden size"),
        (dict(num_layers=3), "layers"),
        (dict(vocab_size=64), "vocabulary"),
    ],
)
def test_drafter_for_another_target_is_refused(setup, other, message):
    target, ids, _ = setup
    other_target = make_target("llama", seed=0, enable=False, **other)
    drafter = make_drafter(other_target)
    with pytest.raises(ValueError, match=f"Drafter/target mismatch.*{message}"):
        target.generate(ids, assistant_model=drafter, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"Drafter/target mismatch.*{message}"):
        target.generate(ids, custom_generate=speculative_generate, drafter=drafter, max_new_tokens=3)


def test_mask_token_missing_or_out_of_vocab(setup):
    target, ids, _ = setup
    for mask in (None, VOCAB, -1):
        drafter = make_drafter(target)
        drafter.config.mask_token_id = mask
        with pytest.raises(ValueError, match="mask_token_id"):
            target.generate(ids, assistant_model=drafter, max_new_tokens=3)
    with pytest.raises(ValueError, match="needs `mask_token_id`"):
        DFlashDrafter.from_target(target, num_layers=1, block_size=4)


def test_custom_generate_without_drafter(setup):
    target, ids, _ = setup
    with pytest.raises(ValueError, match="speculative_generate needs `drafter=`"):
        target.generate(ids, custom_generate=speculative_generate, max_new_tokens=3)


def test_custom_generate_with_non_dflash_drafter(setup):
    target, ids, _ = setup
    with pytest.raises(TypeError, match="Expected a blockpilot_hf.DFlashDrafter"):
        target.generate(ids, custom_generate=speculative_generate, drafter=make_target(enable=False), max_new_tokens=3)


# ----------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("block_size", (1, 4, 11))
def test_output_scores_and_logits_match_plain_greedy(setup, block_size):
    target, ids, _ = setup
    kwargs = dict(do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = target.generate(ids, **kwargs)
    for drafter in (make_drafter(target), make_oracle(target, ids, N_NEW, corrupt_fraction=0.3)):
        out = target.generate(ids, assistant_model=drafter, block_policy=block_size, **kwargs)
        assert isinstance(out, BlockPilotGenerateOutput)
        assert torch.equal(out.sequences, expected.sequences)
        assert len(out.scores) == len(expected.scores) == N_NEW
        assert len(out.logits) == N_NEW
        for got, want in zip(out.scores, expected.scores):
            assert got.shape == want.shape == (1, VOCAB)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got, want in zip(out.logits, expected.logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_output_scores_with_processors_and_eos(setup):
    """Processed scores (repetition penalty) and a stop mid-block: one row per committed token, nothing after EOS."""
    target, ids, _ = setup
    reference = greedy_reference(target, ids, N_NEW, repetition_penalty=1.3)[0, ids.shape[1] :].tolist()
    index = next(i for i in range(4, N_NEW) if reference[i] not in reference[:i])
    kwargs = dict(
        do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True, output_scores=True,
        repetition_penalty=1.3, eos_token_id=reference[index],
    )
    expected = target.generate(ids, **kwargs)
    drafter = make_oracle(target, ids, N_NEW, repetition_penalty=1.3)
    out = target.generate(ids, assistant_model=drafter, block_policy=8, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.scores) == len(expected.scores) == index + 1
    for got, want in zip(out.scores, expected.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_return_dict_fields(setup):
    target, ids, drafter = setup
    out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=7, return_dict_in_generate=True)
    assert isinstance(out, BlockPilotGenerateOutput)
    assert out.scores is None and out.logits is None
    assert out.block_sizes == [drafter.config.block_size]
    assert len(out.acceptance_lengths) == 1 and 1 + sum(out.acceptance_lengths[0]) == 7


# ----------------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("size", (1, 3, 7))
def test_policy_object_is_called_once_and_its_choice_used(setup, size):
    target, ids, _ = setup
    drafter = make_oracle(target, ids, N_NEW, block_size=4)
    policy = FixedSizes([size])
    out = target.generate(
        ids, assistant_model=drafter, block_policy=policy, do_sample=False, max_new_tokens=N_NEW,
        return_dict_in_generate=True,
    )
    assert len(policy.calls) == 1
    assert out.block_sizes == [size]
    assert all(a == size for a in out.acceptance_lengths[0][:-1])
    assert torch.equal(out.sequences, target.generate(ids, do_sample=False, max_new_tokens=N_NEW))
    prefill = policy.calls[0]
    assert isinstance(prefill, PrefillRepresentation)
    assert prefill.last_logits.shape == (1, VOCAB)
    assert prefill.last_hidden_state.shape == (1, target.config.hidden_size)
    assert prefill.prompt_lengths.tolist() == [ids.shape[1]]
    with torch.no_grad():
        expected_logits = target(ids).logits[:, -1]
    torch.testing.assert_close(prefill.last_logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_policy_returning_bad_sizes(setup):
    target, ids, drafter = setup
    with pytest.raises(ValueError, match="out of range"):
        target.generate(ids, assistant_model=drafter, block_policy=FixedSizes([0]), max_new_tokens=3)

    class TwoSizes(FixedSizes):
        def choose_block_sizes(self, prefill):
            return torch.tensor([3, 4])

    with pytest.raises(ValueError, match="returned 2 sizes for a batch of 1"):
        target.generate(ids, assistant_model=drafter, block_policy=TwoSizes([3]), max_new_tokens=3)


def test_learned_block_policy(setup):
    target, ids, _ = setup
    drafter = make_drafter(target, block_size=6)
    torch.manual_seed(0)
    policy = BlockPolicy.from_target(target, drafter=drafter).eval()
    assert policy.config.candidate_block_sizes == [4, 5, 6, 7, 8]
    out = target.generate(
        ids, assistant_model=drafter, block_policy=policy, do_sample=False, max_new_tokens=N_NEW,
        return_dict_in_generate=True,
    )
    assert out.block_sizes[0] in policy.config.candidate_block_sizes
    assert torch.equal(out.sequences, target.generate(ids, do_sample=False, max_new_tokens=N_NEW))
    # a policy trained for another drafter block size is refused
    with pytest.raises(ValueError, match="trained for a drafter with block size 6"):
        target.generate(ids, assistant_model=make_drafter(target, block_size=5), block_policy=policy, max_new_tokens=3)
