"""How a copy from the context and the drafter's block could share a verify step (issue 17), decided on paper first.

Greedy decoding is deterministic and both proposers are path-independent: the drafter's block at anchor p depends
only on the target's features of positions < p and on x_p (`training.labels.accepted_at_anchors` computes it at
every anchor in one pass, as `collect-labels` does), and a copy depends only on the tokens up to p. So one table of
"proposals accepted at every anchor", per proposer, replays any way of combining them exactly, without building it:

- drafter alone, blocks of 4, 8 and 16 slots (anchor + proposals);
- copy alone (16 slots): the latest earlier occurrence of the last 4, 3, 2, then 1 committed tokens (the longest
  suffix that occurs), then up to 15 following tokens (never past the anchor); no match is a plain step;
- one chain per step (16 slots): the copy when its suffix matched at least `m` tokens (m = 1..4), else the
  drafter's block; and the oracle that always takes the better chain (an upper bound on any per-step choice);
- a two-branch tree in V slots (8 or 16): the anchor, the drafter's first D proposals, the copy's first V - 1 - D
  tokens (each branch sees the anchor and itself); slots the copy leaves empty (a short copy, no match) go to the
  drafter. A step accepts the longer branch.

Speed at batch 1 comes from the measured step costs (`blockpilot bench --step-costs`, its `.breakdown.json`):
verify of the step's V slots plus the draft step of V slots (none for copy alone), against plain decoding's step,
per token. A tree costs what a chain of the same slots costs on this accounting (the tree mask is not timed here).

Run: .venv/bin/python results/current/copy_branch/proposer_choice.py CONTINUATIONS STEP_COSTS OUT [DRAFTER]
CONTINUATIONS: the target's greedy HumanEval answers (results/current/study_runs/humaneval_continuations.jsonl);
STEP_COSTS: results/current/step_costs_by_machine/intel_r_xeon_r_processor_amx_bf16_avx512_bf16.breakdown.json; DRAFTER: the shipped one when left
out. Writes OUT.json (strategies), OUT.tables.json (the per-anchor tables, reused by a rerun) and OUT.png.
"""

import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blockpilot_hf.default_model import DEFAULT_DRAFTER_PATH
from blockpilot_hf.features import context_features
from blockpilot_hf.loading import load_prompts, load_target
from blockpilot_hf.modeling_drafter import DFlashDrafter, draft_head, drafter_dtype_for
from blockpilot_hf.training.data import chat_prompt_ids, read_jsonl
from blockpilot_hf.training.labels import accepted_at_anchors

MAX_NGRAM = 4  # the copy's longest suffix
DRAFT_BLOCKS = (4, 8, 16)


def copy_proposal(tokens: list[int], anchor: int, max_tokens: int) -> tuple[int, list[int]]:
    """`(matched suffix length, proposed tokens)` at `anchor` (tokens[: anchor + 1] committed): the latest earlier
    occurrence of the longest suffix (up to MAX_NGRAM tokens) and what followed it, never past the anchor."""
    for n in range(min(MAX_NGRAM, anchor), 0, -1):
        suffix = tokens[anchor - n + 1 : anchor + 1]
        for start in range(anchor - n, -1, -1):  # latest occurrence first
            if tokens[start : start + n] == suffix:
                return n, tokens[start + n : min(start + n + max_tokens, anchor + 1)]
    return 0, []


def accepted_prefix(proposed: list[int], truth: list[int]) -> int:
    count = 0
    for a, b in zip(proposed, truth):
        if a != b:
            break
        count += 1
    return count


@torch.no_grad()
def acceptance_tables(continuations_path, drafter_path, tables_path: Path) -> dict:
    """Per prompt and anchor: proposals the target accepts from the drafter at each block size and from the copy,
    with the copy's matched suffix and proposal length. Prompts already in `tables_path` are not recomputed."""
    tables = json.loads(tables_path.read_text()) if tables_path.is_file() else {}
    continuations = {r["prompt_id"]: r["input_ids"] for r in read_jsonl(continuations_path)}
    todo = [p for p in continuations if p not in tables]
    if not todo:
        return tables
    target, tokenizer = load_target("default", torch.float32)
    drafter = DFlashDrafter.from_pretrained(drafter_path, dtype=drafter_dtype_for(target)).eval()
    lm_head = draft_head(target, drafter)
    prompt_lens = {
        p["prompt_id"]: len(chat_prompt_ids(tokenizer, p["prompt"])) for p in load_prompts("humaneval", None, 0)
    }
    for prompt_id in tqdm(todo, desc="acceptance tables"):
        tokens = continuations[prompt_id]
        prompt_len = prompt_lens[prompt_id]
        input_ids = torch.tensor([tokens])
        outputs = target(input_ids=input_ids, output_hidden_states=True)
        picks = outputs.logits[0].argmax(-1)
        features = context_features(outputs.hidden_states, drafter.config.target_layer_ids)
        anchors = torch.arange(prompt_len, len(tokens) - 1)
        row = {"prompt_len": prompt_len, "seq_len": len(tokens), "drafter": {}}
        for b in DRAFT_BLOCKS:
            accepted = accepted_at_anchors(drafter, target, lm_head, features, input_ids, picks, anchors, b)
            row["drafter"][str(b)] = accepted.tolist()
        copies = [copy_proposal(tokens, p, max(DRAFT_BLOCKS) - 1) for p in anchors.tolist()]
        row["copy_matched"] = [n for n, _ in copies]
        row["copy_length"] = [len(proposed) for _, proposed in copies]
        row["copy_accepted"] = [
            accepted_prefix(proposed, tokens[p + 1 :]) for p, (_, proposed) in zip(anchors.tolist(), copies)
        ]
        tables[prompt_id] = row
        tables_path.write_text(json.dumps(tables))
    return tables


def strategies() -> dict:
    """name -> (slots, runs the drafter, accepted(row, i) for anchor index i)."""
    chosen = {}
    for b in DRAFT_BLOCKS:
        chosen[f"drafter {b}"] = (b, True, lambda r, i, b=b: r["drafter"][str(b)][i])
    chosen["copy 16"] = (16, False, lambda r, i: r["copy_accepted"][i])
    chosen["oracle chain 16"] = (16, True, lambda r, i: max(r["drafter"]["16"][i], r["copy_accepted"][i]))
    for m in range(1, MAX_NGRAM + 1):
        chosen[f"chain 16, copy if suffix >= {m}"] = (
            16,
            True,
            lambda r, i, m=m: r["copy_accepted"][i] if r["copy_matched"][i] >= m else r["drafter"]["16"][i],
        )
    for slots, splits in ((8, (2, 3, 4)), (16, (3, 4, 6, 8))):
        for d in splits:
            copy_slots = slots - 1 - d

            def tree(r, i, slots=slots, copy_slots=copy_slots):
                copy_used = min(copy_slots, r["copy_length"][i])
                drafter_slots = slots - 1 - copy_used  # what the copy leaves empty goes to the drafter
                return max(min(r["drafter"][str(slots)][i], drafter_slots), min(r["copy_accepted"][i], copy_used))

            chosen[f"tree {slots}, D={d} C={copy_slots}"] = (slots, True, tree)
    return chosen


def simulate(tables: dict, costs: dict) -> dict:
    """Per strategy: pooled and per-prompt tau, and speed over plain decoding from the step costs."""
    results = {}
    for name, (slots, drafts, accepted) in strategies().items():
        tokens = steps = 0
        seconds, per_prompt = 0.0, []
        for row in tables.values():
            anchor, prompt_len, seq_len = row["prompt_len"], row["prompt_len"], row["seq_len"]
            row_tokens = row_steps = 0
            while anchor < seq_len - 1:
                i = anchor - prompt_len
                committed = min(accepted(row, i) + 1, seq_len - 1 - anchor)
                if not drafts and row["copy_length"][i] == 0:
                    seconds += costs["plain"]  # copy alone without a match: a plain step
                else:
                    block = costs["blocks"][str(slots)]
                    seconds += block["verify"] + (block["draft"] if drafts else 0.0)
                row_tokens, row_steps, anchor = row_tokens + committed, row_steps + 1, anchor + committed
            tokens, steps = tokens + row_tokens, steps + row_steps
            per_prompt.append(row_tokens / row_steps)
        results[name] = {
            "slots": slots,
            "tau": tokens / steps,
            "mean_tau_per_prompt": sum(per_prompt) / len(per_prompt),
            "speed_over_plain": tokens * costs["plain"] / seconds,
        }
    return results


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.32 * len(names) + 1.5), sharey=True)
    y = range(len(names))
    left.barh(y, [results[n]["mean_tau_per_prompt"] for n in names], color="tab:blue")
    right.barh(y, [results[n]["speed_over_plain"] for n in names], color="tab:green")
    left.set_yticks(list(y), names)
    left.invert_yaxis()
    left.set_xlabel("mean tau per prompt (HumanEval, greedy, 256 new tokens)")
    right.set_xlabel("speed over plain decoding, batch 1 (from step costs)")
    right.axvline(1.0, color="grey", lw=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(continuations_path, step_costs_path, out, drafter_path=str(DEFAULT_DRAFTER_PATH)):
    out = Path(out)
    tables = acceptance_tables(continuations_path, drafter_path, out.with_suffix(".tables.json"))
    costs = json.loads(Path(step_costs_path).read_text())["batch"]["1"]
    results = simulate(tables, costs)
    summary = {"prompts": len(tables), "drafter": str(drafter_path), "step_costs": str(step_costs_path)}
    out.with_suffix(".json").write_text(json.dumps({**summary, "strategies": results}, indent=1))
    plot(results, out.with_suffix(".png"), f"{len(tables)} HumanEval prompts, drafter {Path(drafter_path).name}")
    for name, row in results.items():
        print(
            f"{name:34s} tau {row['tau']:.3f}  per prompt {row['mean_tau_per_prompt']:.3f}  "
            f"x plain {row['speed_over_plain']:.3f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
