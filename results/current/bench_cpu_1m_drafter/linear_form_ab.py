"""Does the packed linear form pay on this CPU? The loop's steps in the packed form (the rule,
`cpu_linear.decoding_linear_form`) against the usual `linear`, and plain `generate` in both, interleaved per prompt.

    .venv/bin/python results/current/bench_cpu_1m_drafter/linear_form_ab.py results/current/bench_cpu_1m_drafter/linear_form_ab.json

Greedy, batch 1, the first 8 HumanEval problems, 128 new tokens, the shipped drafter; every output is checked against
plain `generate`. Tokens/s per (form, method); each prompt runs every pair once after one warm-up prompt.
"""

import contextlib
import json
import sys
import time

import torch

import blockpilot_hf
import blockpilot_hf.decoding.workspace as workspace
from blockpilot_hf.hardware import cpu_description
from blockpilot_hf.cpu_linear import PackedLinear
from blockpilot_hf.loading import load_prompts
from blockpilot_hf.training.data import chat_prompt_ids

FORMS = {"packed": PackedLinear, "usual": contextlib.nullcontext}
METHODS = {
    "plain": {},
    "fixed=1": dict(block_policy=1),
    "fixed=4": dict(block_policy=4),
    "fixed=4+copy=5": dict(block_policy=4, prompt_lookup_num_tokens=5),
}


def main(out_path):
    torch.set_num_threads(2)
    target, tokenizer, drafter, _ = blockpilot_hf.load_default(dtype=torch.float32)
    prompts = load_prompts("humaneval", 8, 0)
    totals = {(form, method): [0, 0.0] for form in FORMS for method in METHODS}
    for index, row in enumerate([prompts[0]] + prompts):  # the first is a warm-up
        ids = torch.tensor([chat_prompt_ids(tokenizer, row["prompt"])])
        expected = None
        for form_name, form in FORMS.items():
            workspace_form = workspace.decoding_linear_form
            workspace.decoding_linear_form = lambda device, form=form: form
            target.__dict__.pop("_blockpilot_workspaces", None)  # steps keep the form they were built with
            try:
                for method, options in METHODS.items():
                    kwargs = dict(do_sample=False, max_new_tokens=128)
                    context = form() if method == "plain" else contextlib.nullcontext()
                    if method != "plain":
                        kwargs["assistant_model"] = drafter
                    start = time.perf_counter()
                    with context:
                        out = target.generate(ids, **kwargs, **options)
                    seconds = time.perf_counter() - start
                    expected = out if expected is None else expected
                    assert torch.equal(out, expected), (form_name, method)
                    if index:
                        totals[form_name, method][0] += out.shape[1] - ids.shape[1]
                        totals[form_name, method][1] += seconds
            finally:
                workspace.decoding_linear_form = workspace_form
    result = {
        "cpu": cpu_description(),
        "prompts": len(prompts),
        "tokens_per_s": {f"{form} {method}": tokens / seconds for (form, method), (tokens, seconds) in totals.items()},
    }
    print(json.dumps(result, indent=1))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
