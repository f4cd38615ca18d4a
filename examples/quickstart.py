"""Quickstart on the embedded default: SmolLM2-135M-Instruct with the shipped drafter and block policy.

    python examples/quickstart.py "Write a haiku about speculative decoding." --max-new-tokens 64
"""

import argparse
import time

import torch
from transformers import TextStreamer, pipeline

import blockpilot_hf
from blockpilot_hf.training.data import chat_prompt_ids, generation_pad_id, left_pad


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt", nargs="?", default="Explain in two sentences what a hash map is.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    target, tokenizer, drafter, policy = blockpilot_hf.load_default(device="cpu")  # target comes back enable()d
    ids = torch.tensor([chat_prompt_ids(tokenizer, args.prompt)])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    plain = target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    for label, block_policy in (("fixed block size 8", 8), ("learned policy", policy)):
        print(f"--- {label}")
        start = time.perf_counter()
        out = target.generate(
            ids,
            assistant_model=drafter,
            block_policy=block_policy,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            return_dict_in_generate=True,
        )
        seconds = time.perf_counter() - start
        steps = out.acceptance_lengths[0]
        print(
            f"[block size {out.block_sizes[0]}, {len(steps)} target forwards for {out.sequences.shape[1] - ids.shape[1]} "
            f"tokens (tau {sum(steps) / max(1, len(steps)):.2f}), {seconds:.2f}s, "
            f"identical to plain greedy: {torch.equal(out.sequences, plain)}]"
        )

    # A batch: left-padded prompts of different lengths; the policy picks a block size per row.
    prompts = [args.prompt, "What is a Python list?", "Name three sorting algorithms."]
    batch, mask = left_pad([chat_prompt_ids(tokenizer, p) for p in prompts], generation_pad_id(tokenizer))
    width = batch.shape[1]
    plain = target.generate(batch, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False)
    out = target.generate(
        batch, attention_mask=mask, assistant_model=drafter, block_policy=policy, max_new_tokens=args.max_new_tokens,
        return_dict_in_generate=True,
    )
    print(f"--- batch of {len(prompts)}: block sizes {out.block_sizes}, identical to plain batched greedy: "
          f"{torch.equal(out.sequences, plain)}")
    for text in tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True):
        print("*", text.strip()[:120])

    # Sampling: three answers to one prompt in one call, each distributed as the target's own sampling.
    samples = target.generate(
        ids, assistant_model=drafter, block_policy=policy, do_sample=True, temperature=0.7, top_p=0.9,
        num_return_sequences=3, max_new_tokens=args.max_new_tokens,
    )
    print("--- three samples (temperature 0.7, top-p 0.9)")
    for text in tokenizer.batch_decode(samples[:, ids.shape[1] :], skip_special_tokens=True):
        print("*", text.strip()[:120])

    # A text-generation pipeline takes the drafter like any assistant model.
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    messages = [{"role": "user", "content": args.prompt}]
    answer = pipe(messages, block_policy=policy, max_new_tokens=args.max_new_tokens, do_sample=False)
    expected = pipeline("text-generation", model=target, tokenizer=tokenizer)(
        messages, max_new_tokens=args.max_new_tokens, do_sample=False
    )
    print(f"--- pipeline, identical to the pipeline without the drafter: {answer == expected}")
    print("*", answer[0]["generated_text"][-1]["content"].strip()[:120])


if __name__ == "__main__":
    main()
