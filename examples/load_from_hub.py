"""Load a drafter and a block policy by Hub id (works offline from a populated cache: HF_HUB_OFFLINE=1).

    python examples/load_from_hub.py --target HuggingFaceTB/SmolLM2-135M-Instruct \
        --drafter you/smollm2-135m-dflash-b16 --policy you/smollm2-135m-blockpilot
"""

import argparse

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import blockpilot_hf  # registers the drafter and policy classes with AutoModel
from blockpilot_hf.training.data import chat_prompt_ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="path or Hub id of the target")
    parser.add_argument("--drafter", required=True, help="path or Hub id of a DFlash drafter (ours or z-lab's)")
    parser.add_argument("--policy", default=None, help="path or Hub id of a BlockPolicy")
    parser.add_argument("--prompt", default="Write a Python function that reverses a list.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = blockpilot_hf.enable(AutoModelForCausalLM.from_pretrained(args.target).eval())
    drafter = blockpilot_hf.DFlashDrafter.from_pretrained(args.drafter).eval()
    policy = AutoModel.from_pretrained(args.policy).eval() if args.policy else None
    ids = torch.tensor([chat_prompt_ids(tokenizer, args.prompt)])
    out = target.generate(
        ids, assistant_model=drafter, block_policy=policy, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True
    )
    print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"block size {out.block_sizes[0]}, acceptance lengths {out.acceptance_lengths[0]}")


if __name__ == "__main__":
    main()
