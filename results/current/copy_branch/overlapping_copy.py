"""What the copy proposer's overlapping copy and its longest matched suffix (`max_ngram`) change in tau (issue 17).

Greedy decoding with the copy chain is exact to replay from per-anchor tables: the copy at anchor p depends only on
the tokens up to p (`training.labels.copy_accepted_at_anchors`, what `collect-labels --copy-tokens` runs), the
drafter's block only on the target's features before p (`proposer_choice.py`'s tables of the shipped drafter). A
step of the built tree [anchor, B - 1 drafted, C copied] commits 1 + the longer accepted branch. The proposer before
overlapping copies stopped at the end of the context; it is rebuilt here as `StoppingAtTheEnd`.

Run: .venv/bin/python results/current/copy_branch/overlapping_copy.py results/current/copy_branch/overlapping_copy.json
(reads ../study_runs/humaneval_continuations.jsonl and curve_1m_drafter.tables.json; a few seconds, no model run).
"""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from blockpilot_hf.decoding import context_copy
from blockpilot_hf.default_model import default_target_path
from blockpilot_hf.prompts import load_humaneval_prompts
from blockpilot_hf.training.data import chat_prompt_ids
from blockpilot_hf.training.labels import copy_accepted_at_anchors

HERE = Path(__file__).parent
OVERLAPPING = context_copy.ContextCopyProposer.propose


class StoppingAtTheEnd(context_copy.ContextCopyProposer):
    def propose(self, row):
        tokens, index, start = self.sequences[row], self.latest_end[row], self.starts[row]
        for n in range(min(self.max_ngram, len(tokens) - start), 0, -1):
            end = index.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                return tokens[end : end + self.num_tokens]
        return []


def mean_tau(accepted: list[int], drafted: list[int] | None, prompt_len: int, seq_len: int, block_size: int) -> float:
    steps, anchor = [], prompt_len
    while anchor < seq_len - 1:
        i = anchor - prompt_len
        best = max(accepted[i], min(drafted[i], block_size - 1)) if drafted else accepted[i]
        steps.append(min(best + 1, seq_len - 1 - anchor))
        anchor += steps[-1]
    return sum(steps) / len(steps)


def main(out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_target_path())
    prompts = {p["prompt_id"]: p["prompt"] for p in load_humaneval_prompts()}
    tables = json.loads((HERE / "curve_1m_drafter.tables.json").read_text())
    lines = (HERE.parent / "study_runs" / "humaneval_continuations.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    rows = [r for r in rows if r["max_new_tokens"] == 256]
    results = []
    for overlapping in (False, True):
        context_copy.ContextCopyProposer.propose = OVERLAPPING if overlapping else StoppingAtTheEnd.propose
        for max_ngram in (2, 4, 8):
            for copy_tokens in (5, 8, 15):
                taus = {"copy alone": [], "B=4 + copy": [], "B=16 + copy": []}
                for row in rows:
                    tokens = row["input_ids"]
                    prompt_len = len(chat_prompt_ids(tokenizer, prompts[row["prompt_id"]]))
                    # the continuation is the target's greedy answer: its pick after position i is token i + 1
                    accepted = copy_accepted_at_anchors(tokens, tokens[1:], prompt_len, copy_tokens, max_ngram)
                    drafter = tables[row["prompt_id"]]["drafter"]
                    taus["copy alone"].append(mean_tau(accepted, None, prompt_len, len(tokens), 1))
                    taus["B=4 + copy"].append(mean_tau(accepted, drafter["4"], prompt_len, len(tokens), 4))
                    taus["B=16 + copy"].append(mean_tau(accepted, drafter["16"], prompt_len, len(tokens), 16))
                result = {"overlapping": overlapping, "max_ngram": max_ngram, "copy_tokens": copy_tokens}
                result.update({name: round(sum(t) / len(t), 4) for name, t in taus.items()})
                results.append(result)
                print(result)
    context_copy.ContextCopyProposer.propose = OVERLAPPING
    Path(out).write_text(json.dumps({"problems": len(rows), "max_new_tokens": 256, "results": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
