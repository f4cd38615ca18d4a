"""What a draft vocabulary saves in a draft step on CPU: `greedy_proposals` with the shipped drafter's scoring head
(bf16 copy of SmolLM2's LM head) over the whole vocabulary and over its 16,384-token draft vocabulary, for the rows a
draft step scores (batch x (block size - 1)). Median ms. `python results/draft_head_cpu.py` writes
`results/draft_head_cpu.json`.
"""

import json
import platform
from pathlib import Path

import torch

from blockpilot_hf.default_model import load_default
from blockpilot_hf.modeling_drafter import draft_head, greedy_proposals
from matmul_rows_cpu import median_ms  # the sibling script (its folder is on sys.path when run as a script)


@torch.no_grad()
def main():
    target, _, drafter, _ = load_default(device="cpu")
    drafter = drafter.to(torch.bfloat16)
    vocabulary = drafter.draft_token_ids.clone()
    heads = {"draft_vocabulary": draft_head(target, drafter)}
    drafter.set_draft_vocabulary(None)
    heads["whole_vocabulary"] = draft_head(target, drafter)
    result = {"cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "draft_vocab_size": len(vocabulary)}
    for rows in (1, 2, 3, 6, 15):
        hidden = torch.randn(rows, target.config.hidden_size)
        result[f"{rows}_rows_ms"] = {name: median_ms(lambda h=head: greedy_proposals(h, hidden), repeats=30) for name, head in heads.items()}
        print(rows, result[f"{rows}_rows_ms"])
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
