"""The loop's sampler, Gumbel-max (`decoding.steps.select_tokens`) against softmax + `torch.multinomial` (before).

1. The sampler alone at the shapes of a step (batch x slots x the 49,152-token vocabulary): median of 50 calls.
2. The loop's seconds per decoding step with each sampler, interleaved on the same batches (T = 1, the first 8
   HumanEval problems, 64 new tokens, drafter B = 4 with and without the 5-token copy chain, batch 1 and 4, the
   default target in fp32). Per step, not per token: sampled answers differ from run to run, and so do tau and
   the tokens a step commits, which would swamp the sampler's share in tokens/s.

Run: .venv/bin/python results/current/sampler_ab/gumbel_ab.py > results/current/sampler_ab/gumbel_ab.txt
"""

import platform
import statistics
import time

import torch

from blockpilot_hf.decoding import loop
from blockpilot_hf.default_model import load_default
from blockpilot_hf.prompts import load_humaneval_prompts
from blockpilot_hf.training.data import chat_prompt_ids, left_pad

GUMBEL = loop.select_tokens


def multinomial(scores, do_sample):
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), num_samples=1).view(probs.shape[:-1])


SAMPLERS = {"multinomial": multinomial, "gumbel": GUMBEL}


def sampler_alone(vocab: int) -> None:
    for batch_size, slots in ((1, 4), (1, 9), (4, 4), (4, 9), (16, 2)):
        scores = torch.randn(batch_size, slots, vocab)
        ms = {}
        for name, sampler in SAMPLERS.items():
            times = []
            for _ in range(50):
                begin = time.perf_counter()
                sampler(scores, True)
                times.append(time.perf_counter() - begin)
            ms[name] = 1000 * statistics.median(times)
        print(
            f"sampler alone, batch {batch_size} x {slots} slots: multinomial {ms['multinomial']:.2f} ms, "
            f"gumbel {ms['gumbel']:.2f} ms"
        )


def main():
    target, tokenizer, drafter, _ = load_default()
    prompts = [chat_prompt_ids(tokenizer, p["prompt"]) for p in load_humaneval_prompts(8)]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    sampler_alone(target.config.vocab_size)
    ids, mask = left_pad(prompts[:4], tokenizer.pad_token_id)
    for copy_tokens in (0, 5):  # warm-up: packs the weights, times the linear forms once, sizes the workspaces
        target.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=16,
            assistant_model=drafter,
            block_policy=4,
            prompt_lookup_num_tokens=copy_tokens,
        )
    for batch_size in (1, 4):
        for copy_tokens in (0, 5):
            seconds, steps = {name: 0.0 for name in SAMPLERS}, {name: 0 for name in SAMPLERS}
            for start in range(0, len(prompts), batch_size):
                ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
                kwargs = dict(
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    max_new_tokens=64,
                    assistant_model=drafter,
                    block_policy=4,
                    prompt_lookup_num_tokens=copy_tokens,
                    return_dict_in_generate=True,
                )
                for name in ("multinomial", "gumbel", "multinomial", "gumbel"):
                    loop.select_tokens = SAMPLERS[name]
                    begin = time.perf_counter()
                    out = target.generate(ids, **kwargs)
                    seconds[name] += time.perf_counter() - begin
                    steps[name] += max(len(row) for row in out.acceptance_lengths)
            loop.select_tokens = GUMBEL
            ms = {name: 1000 * seconds[name] / steps[name] for name in SAMPLERS}
            print(
                f"loop, batch {batch_size}, B = 4{' + copy 5' if copy_tokens else ''}: multinomial "
                f"{ms['multinomial']:.1f} ms a step, gumbel {ms['gumbel']:.1f} ({ms['gumbel'] / ms['multinomial']:.2f}x)"
            )


if __name__ == "__main__":
    main()
