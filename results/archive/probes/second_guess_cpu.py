"""How often the drafter's runner-up proposal is right where its first one is wrong: the first block position of
every decoding step of the shipped drafter on HumanEval (greedy, batch 1, fixed block size), its top-3 proposals there
against the target's own pick. A one-token branch verifying the runner-up (tree attention) would commit one more
token in `top2` of the steps. `python results/second_guess_cpu.py [--limit 16] [--block-size 4]` writes
`results/second_guess_cpu.json`.
"""

import argparse
import json
from pathlib import Path

import torch

from blockpilot_hf import decoding
from blockpilot_hf.default_model import load_default
from blockpilot_hf.prompts import load_humaneval_prompts
from blockpilot_hf.training.data import chat_prompt_ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    target, tokenizer, drafter, _ = load_default()
    last_top3, hits = {}, {"steps": 0, "top1": 0, "top2": 0, "top3": 0}

    def ranked_proposals(head, hidden_states):
        # `greedy_proposals`, keeping the top 3 of the first proposal
        flat = hidden_states.reshape(-1, hidden_states.shape[-1]).to(head.weight.dtype)
        top = head(flat).topk(3, dim=-1).indices
        token_ids = getattr(head, "draft_token_ids", None)
        top = token_ids[top] if token_ids is not None else top
        last_top3["first"] = top.view(*hidden_states.shape[:-1], 3)[0, 0].tolist()
        return top[:, 0].view(hidden_states.shape[:-1])

    verify_call = decoding.VerifyStep.__call__

    def verify_and_count(step):
        logits, features, target_picks = verify_call(step)
        first_pick = int(target_picks[0, 0])  # the target's token after the anchor
        hits["steps"] += 1
        for rank, name in enumerate(("top1", "top2", "top3")):
            hits[name] += int(last_top3["first"][rank] == first_pick)
        return logits, features, target_picks

    decoding.greedy_proposals, decoding.VerifyStep.__call__ = ranked_proposals, verify_and_count
    for row in load_humaneval_prompts(args.limit):
        ids = torch.tensor([chat_prompt_ids(tokenizer, row["prompt"])])
        target.generate(ids, assistant_model=drafter, block_policy=args.block_size, max_new_tokens=args.max_new_tokens)
    steps = hits["steps"]
    result = {
        "prompts": args.limit,
        "block_size": args.block_size,
        "steps": steps,
        **{f"{name}_rate": hits[name] / steps for name in ("top1", "top2", "top3")},
        "top2_rate_among_top1_misses": hits["top2"] / max(1, steps - hits["top1"]),
    }
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
