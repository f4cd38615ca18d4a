"""Policy labels: per prompt, the mean acceptance length (tau) at every candidate block size.

The steps the decoding loop takes are a function of the tokens it commits, so they can be *replayed* on the target's
continuation without running the loop once per block size: one target forward over the whole sequence gives every
position's context features and the target's picks; one batched drafter forward over all anchors, with the same block
layout (`layout.build_block_layout`) decoding uses, gives every block's proposals; walking anchor to anchor then
reproduces the loop's acceptance lengths. With a copy chain (`prompt_lookup_num_tokens`), the copy proposer runs
over the same sequence anchor by anchor, and a step commits the longer of the two accepted chains, as the tree walk
does. With sampling (`temperature > 0`) the continuation is one sample of the target and the target's picks are its
own tokens: the loop commits exactly those tokens with the same probability, and given them takes exactly the
replayed steps, so a sampled replay is one draw of the loop's acceptance at that temperature (the drafter proposes
its argmax either way). `tests/test_labels.py` checks the replay against the real loop, greedy and sampled.

`collect_labels` runs under `accelerate launch` (prompts split across processes, rows gathered, main process writes
one JSONL keyed by `prompt_id`; reruns skip done ids, and refuse a file of another drafter or other settings). The
greedy continuations are most of its cost and depend on the target alone: `continuations_path` keeps them, so
labelling many drafters of one target (a learning curve, an ablation) generates them once.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..decoding.context_copy import DEFAULT_MAX_NGRAM, ContextCopyProposer
from ..decoding.requests import pad_token_id
from ..features import PrefillRepresentation, context_features, prefill_summary_features
from ..layout import build_block_layout
from ..metrics import mean_tau
from ..modeling_drafter import draft_head, greedy_proposals
from .data import append_jsonl, chat_prompt_ids, generate_left_padded, read_jsonl


@torch.no_grad()
def accepted_at_anchors(
    drafter, target, lm_head, features, input_ids, picks, anchors, block_size, chunk=64
) -> torch.LongTensor:
    """How many proposals the target accepts when a `block_size` block is drafted at each anchor in `anchors` (1D).

    Proposal k of the block anchored at p sits at position p + 1 + k and is accepted iff it and every earlier proposal
    equal the target's picks there (`picks[p + k]`). The LM head (the expensive part: vocabulary-wide) only runs at
    position k for anchors whose proposals all matched so far.
    """
    device = input_ids.device
    seq_len = input_ids.shape[1]
    context_positions = torch.arange(seq_len, device=device)[None]
    embed = target.get_input_embeddings()
    accepted = torch.zeros(len(anchors), dtype=torch.long, device=device)
    for i in range(0, len(anchors), chunk):
        part = anchors[None, i : i + chunk]
        layout = build_block_layout(
            anchor_ids=input_ids[:, part[0]],
            anchor_positions=part,
            block_size=block_size,
            mask_token_id=drafter.config.mask_token_id,
            context_positions=context_positions,
        )
        hidden = drafter(
            noise_embeds=embed(layout.input_ids),
            context_hidden_states=features,
            position_ids=torch.cat([context_positions, layout.position_ids], dim=1),
            attention_mask=layout.attention_mask,
        ).last_hidden_state
        hidden = hidden.view(part.shape[1], block_size, -1)[:, 1:]
        alive = torch.arange(part.shape[1], device=device)
        for k in range(block_size - 1):
            positions = part[0, alive] + k
            in_range = positions < seq_len - 1
            alive, positions = alive[in_range], positions[in_range]
            if len(alive) == 0:
                break
            proposal = greedy_proposals(lm_head, hidden[alive, k])
            alive = alive[proposal == picks[positions]]
            accepted[i + alive] += 1
    return accepted


def prefill_logits_file_name(prompt_id: str) -> str:
    """File `collect_labels(logits_path=...)` saves a prompt's raw prefill logits under (ids may contain '/')."""
    return prompt_id.replace("/", "__") + ".safetensors"


@dataclass
class Replay:
    """What one teacher-forced pass over a greedy continuation tells.

    Attributes:
        acceptance_lengths (`dict[int, list[int]]`): per block size, committed tokens per decoding step (the same
            quantity as `BlockPilotGenerateOutput.acceptance_lengths`).
        prefill (`PrefillRepresentation`): the policy's input, read off the same pass (causal attention makes the
            prompt positions identical to a prefill).
        copy_acceptance_lengths (`dict[int, list[int]]`): the same per block size with the copy chain beside the
            drafter's (empty without `copy_tokens`); block size 1 is the copy chain alone.
    """

    acceptance_lengths: dict[int, list[int]]
    prefill: PrefillRepresentation
    copy_acceptance_lengths: dict[int, list[int]] = None


def copy_accepted_at_anchors(tokens: list[int], picks: list[int], prompt_len: int, copy_tokens: int, max_ngram: int):
    """Per anchor `prompt_len ...` (the committed tokens end at it), how many of the copy proposer's tokens the
    target accepts: proposal j sits at position anchor + 1 + j and must equal `picks[anchor + j]`, as must every one
    before it."""
    committed = tokens[: prompt_len + 1]
    copier = ContextCopyProposer([committed], [0], copy_tokens, max_ngram)
    accepted = []
    for anchor in range(prompt_len, len(tokens) - 1):
        committed[len(committed) :] = tokens[len(committed) : anchor + 1]
        copier.update(0)
        matched = 0
        for j, token in enumerate(copier.propose(0)):
            if anchor + j >= len(picks) or picks[anchor + j] != token:
                break
            matched += 1
        accepted.append(matched)
    return accepted


@torch.no_grad()
def replay_acceptance(
    target,
    drafter,
    input_ids: torch.LongTensor,
    prompt_len: int,
    block_sizes: list[int],
    max_length: int | None = None,
    lm_head=None,
    copy_tokens: int = 0,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    sampled: bool = False,
) -> Replay:
    """Acceptance lengths the loop takes on `input_ids` (prompt + the target's continuation).

    Args:
        input_ids (`torch.LongTensor` of shape `(1, L)`): the prompt followed by the target's greedy output, or by one
            sampled output with `sampled=True`.
        prompt_len (`int`): prompt length; token `prompt_len` is the prefill's token, the first anchor.
        block_sizes (`list[int]`): block sizes to replay.
        max_length (`int`, *optional*): the `max_length` of the generation, which caps the last steps.
        lm_head (*optional*): `modeling_drafter.draft_head(target, drafter)`, made here if not given (pass it when
            replaying many sequences: with a drafter in another dtype it is a copy of the head).
        copy_tokens (`int`): also replay every block size with a copy chain of this many tokens
            (`prompt_lookup_num_tokens`), and block size 1 with the copy chain alone; `max_ngram` is
            `max_matching_ngram_size`.
        sampled (`bool`): the continuation was sampled: the target's pick at each position is the token the sequence
            holds there, not its argmax.
    """
    seq_len = input_ids.shape[1]
    max_length = max_length or seq_len
    lm_head = lm_head if lm_head is not None else draft_head(target, drafter)
    outputs = target(input_ids=input_ids, output_hidden_states=True)
    # picks[i]: the target's token for position i + 1
    picks = input_ids[0, 1:] if sampled else outputs.logits[0].argmax(-1)
    features = context_features(outputs.hidden_states, drafter.config.target_layer_ids)
    prefill = PrefillRepresentation(
        last_logits=outputs.logits[:, prompt_len - 1],
        last_hidden_state=outputs.hidden_states[-1][:, prompt_len - 1],
        prompt_lengths=torch.tensor([prompt_len], device=input_ids.device),
    )
    del outputs
    copied = None
    if copy_tokens:
        copied = copy_accepted_at_anchors(input_ids[0].tolist(), picks.tolist(), prompt_len, copy_tokens, max_ngram)

    def steps_of(accepted: list[int]) -> list[int]:
        steps, anchor = [], prompt_len
        while anchor < seq_len - 1:
            committed = min(accepted[anchor - prompt_len] + 1, seq_len - 1 - anchor, max_length - 1 - anchor)
            steps.append(committed)
            anchor += committed
        return steps

    results, with_copy = {}, {}
    for block_size in sorted(set(block_sizes) | ({1} if copy_tokens else set())):
        # Anchors the walk can visit: every response position but the last. The loop drafts whole blocks to the end
        # (one shape per request) and only caps how many tokens a step may commit near max_length.
        anchors = torch.arange(prompt_len, seq_len - 1, device=input_ids.device)
        accepted = torch.zeros(len(anchors), dtype=torch.long, device=input_ids.device)
        if block_size > 1:
            accepted = accepted_at_anchors(drafter, target, lm_head, features, input_ids, picks, anchors, block_size)
        accepted = accepted.tolist()
        if block_size in block_sizes:
            results[block_size] = steps_of(accepted)
        if copied is not None:
            with_copy[block_size] = steps_of([max(d, c) for d, c in zip(accepted, copied)])  # the longer chain
    return Replay(acceptance_lengths=results, prefill=prefill, copy_acceptance_lengths=with_copy)


@torch.no_grad()
def target_continuations(
    target, tokenizer, prompts: list[dict], max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0
) -> list[list[int]]:
    """The target's continuation of every prompt (chat template applied): prompt ids + response ids; greedy, or one
    sample at `temperature` (seeded by the prompts' ids, so a rerun draws the same).

    Batched with left padding (similar lengths together) because this is the expensive part of labelling.
    """
    pad = pad_token_id(tokenizer)
    encoded = [chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    results: list[list[int] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        if temperature > 0:
            ids = "\n".join(prompts[i]["prompt_id"] for i in group)
            torch.manual_seed(int.from_bytes(hashlib.sha256(ids.encode()).digest()[:8], "little"))
        responses = generate_left_padded(target, [encoded[i] for i in group], pad, max_new_tokens, **sampling)
        for i, response in zip(group, responses):
            results[i] = encoded[i] + response
    return results


def target_identity(target) -> dict:
    """What a greedy continuation depends on besides the prompt: the target's weights and the dtype it ran in."""
    return {"target": target.config._name_or_path, "dtype": str(target.dtype).removeprefix("torch.")}


def drafter_identity(drafter) -> str:
    """A fingerprint of the drafter as it labels: its weights, buffers and their dtypes (16 hex digits of SHA-256)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(drafter.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_resumable(
    rows: list[dict], path, drafter_id: str, block_sizes: list[int], copy_tokens: int, temperature: float = 0.0
) -> None:
    """Refuse to add to a labels file made by another drafter or with other block sizes, copy chain or temperature:
    a rerun skips every prompt the file holds, so mixing would give a file of two drafters' labels without a word."""
    sizes = {str(b) for b in block_sizes}
    for row in rows:
        if row.get("drafter") != drafter_id:
            made_by = row.get("drafter") or "a drafter it does not name (labels made before they named theirs)"
            raise ValueError(
                f"{path} holds labels of {made_by}, not of this drafter ({drafter_id}): give each drafter its own "
                "labels file, or delete this one to label again."
            )
        if set(row["tau"]) != sizes or row.get("copy_tokens", 0) != copy_tokens:
            raise ValueError(
                f"{path} holds labels at block sizes {sorted(map(int, row['tau']))} with copy_tokens="
                f"{row.get('copy_tokens', 0)}, not {sorted(block_sizes)} with copy_tokens={copy_tokens}: use another "
                "labels file for other settings, or delete this one to label again."
            )
        if row.get("temperature", 0.0) != temperature:
            raise ValueError(
                f"{path} holds labels at temperature {row.get('temperature', 0.0)}, not {temperature}: give each "
                "temperature its own labels file (train-policy takes several)."
            )


class ContinuationCache:
    """The target's continuations (prompt + response ids), one JSONL row per `(prompt_id, max_new_tokens,
    temperature)` (0: greedy; rows without one are greedy), made by one target in one dtype; a file made by another
    target is refused rather than silently mixed in."""

    def __init__(self, path, target):
        self.path = Path(path)
        self.identity = target_identity(target)
        self.rows = {}
        for row in read_jsonl(self.path):
            made_by = {k: row[k] for k in self.identity}
            if made_by != self.identity:
                raise ValueError(
                    f"{self.path} holds continuations of {made_by}, not of this target {self.identity}: give each "
                    "target (and dtype) its own continuations file."
                )
            self.rows[(row["prompt_id"], row["max_new_tokens"], row.get("temperature", 0.0))] = row["input_ids"]

    def get(self, prompt_id: str, max_new_tokens: int, temperature: float = 0.0) -> list[int] | None:
        return self.rows.get((prompt_id, max_new_tokens, temperature))

    def add(
        self, prompt_ids: list[str], max_new_tokens: int, sequences: list[list[int]], temperature: float = 0.0
    ) -> None:
        fresh = []
        for prompt_id, sequence in zip(prompt_ids, sequences):
            if (prompt_id, max_new_tokens, temperature) not in self.rows:
                self.rows[(prompt_id, max_new_tokens, temperature)] = sequence
                sampled = {"temperature": temperature} if temperature else {}  # greedy rows read as before
                fresh.append(
                    {
                        "prompt_id": prompt_id,
                        "max_new_tokens": max_new_tokens,
                        **sampled,
                        **self.identity,
                        "input_ids": sequence,
                    }
                )
        append_jsonl(self.path, fresh)


def continuation_sequences(
    target, tokenizer, prompts, max_new_tokens, batch_size, continuations=None, temperature: float = 0.0
):
    """`target_continuations` of `prompts`, read from `continuations` (a `ContinuationCache`) where it has them.
    Returns the sequences and the `(prompt_id, sequence)` pairs that were generated here, for the cache."""
    if continuations is None:
        return target_continuations(target, tokenizer, prompts, max_new_tokens, batch_size, temperature), []
    missing = [p for p in prompts if continuations.get(p["prompt_id"], max_new_tokens, temperature) is None]
    made = {}
    if missing:
        sequences = target_continuations(target, tokenizer, missing, max_new_tokens, batch_size, temperature)
        made = {p["prompt_id"]: sequence for p, sequence in zip(missing, sequences)}
    sequences = [
        made.get(p["prompt_id"]) or continuations.get(p["prompt_id"], max_new_tokens, temperature) for p in prompts
    ]
    return sequences, list(made.items())


@torch.no_grad()
def collect_labels(
    target,
    drafter,
    tokenizer,
    prompts: list[dict],
    out_path,
    block_sizes: list[int],
    max_new_tokens: int = 256,
    logits_path=None,
    batch_size: int = 8,
    continuations_path=None,
    copy_tokens: int = 0,
    temperature: float = 0.0,
) -> list[dict]:
    """For every prompt: the target's continuation, tau at every block size, and the policy features.

    With `continuations_path` (a JSONL, see `ContinuationCache`) the target's continuations are read from it where
    present and added to it where not. With `copy_tokens`, rows also hold `"copy_tokens"` and `"tau_copy"` /
    `"steps_copy"`: every block size with a copy chain of that many tokens beside the drafter's, and block size 1
    with the copy chain alone. With `temperature > 0` the continuation is one sample at that temperature (plain
    temperature sampling, no top-k/top-p) and the labels are sampled decoding's (`replay_acceptance(sampled=True)`);
    rows then hold `"temperature"`. One sample per prompt: its tau is noisy, the policy learns the mean.

    Each JSONL row: `{"prompt_id", "drafter" (`drafter_identity`), "prompt_len", "new_tokens", "tau": {b: mean},
    "steps": {b: n_steps}, "summary_features": [...]}`. With `logits_path` (a directory), the raw last prefill logits
    (the paper's feature, vocabulary-wide) are also saved as one safetensors file per prompt, for the feature
    comparison.
    """
    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU-only launches do not split work
    out_path = Path(out_path)
    drafter_id = drafter_identity(drafter)
    labelled = read_jsonl(out_path)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy).")
    check_resumable(labelled, out_path, drafter_id, block_sizes, copy_tokens, temperature)
    done = {r["prompt_id"] for r in labelled}
    todo = [p for p in prompts if p["prompt_id"] not in done]
    groups = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    lm_head = draft_head(target, drafter)  # once per run: a copy when the drafter has another dtype
    continuations = ContinuationCache(continuations_path, target) if continuations_path is not None else None
    rows_written = []
    with state.split_between_processes(groups, apply_padding=True) as mine:
        for group in tqdm(mine, desc="collecting labels", disable=not state.is_main_process):
            sequences, generated = continuation_sequences(
                target, tokenizer, group, max_new_tokens, batch_size, continuations, temperature
            )
            records = []
            for row, sequence in zip(group, sequences):
                prompt_len = len(chat_prompt_ids(tokenizer, row["prompt"]))
                replay = replay_acceptance(
                    target,
                    drafter,
                    torch.tensor([sequence], device=target.device),
                    prompt_len,
                    block_sizes,
                    max_length=prompt_len + max_new_tokens,
                    lm_head=lm_head,
                    copy_tokens=copy_tokens,
                    sampled=temperature > 0,
                )
                record = {
                    "prompt_id": row["prompt_id"],
                    "drafter": drafter_id,
                    "prompt_len": prompt_len,
                    "new_tokens": len(sequence) - prompt_len,
                    "tau": {str(b): mean_tau(s) for b, s in replay.acceptance_lengths.items()},
                    "steps": {str(b): len(s) for b, s in replay.acceptance_lengths.items()},
                    "acceptance_histogram": {
                        str(b): {str(k): s.count(k) for k in sorted(set(s))}
                        for b, s in replay.acceptance_lengths.items()
                    },
                    "summary_features": prefill_summary_features(replay.prefill)[0].tolist(),
                }
                if temperature:
                    record["temperature"] = temperature
                if copy_tokens:
                    record["copy_tokens"] = copy_tokens
                    record["tau_copy"] = {str(b): mean_tau(s) for b, s in replay.copy_acceptance_lengths.items()}
                    record["steps_copy"] = {str(b): len(s) for b, s in replay.copy_acceptance_lengths.items()}
                records.append(record)
                if logits_path is not None:
                    from safetensors.torch import save_file

                    Path(logits_path).mkdir(parents=True, exist_ok=True)
                    save_file(
                        {"last_logits": replay.prefill.last_logits[0].float().cpu().contiguous()},
                        str(Path(logits_path) / prefill_logits_file_name(row["prompt_id"])),
                    )
            gathered = gather_object(records)
            if continuations is not None:
                generated = gather_object(generated)
                if state.is_main_process:
                    continuations.add(
                        [i for i, _ in generated], max_new_tokens, [seq for _, seq in generated], temperature
                    )
            if state.is_main_process:
                fresh = [r for r in gathered if r["prompt_id"] not in done]
                done.update(r["prompt_id"] for r in fresh)
                append_jsonl(out_path, fresh)
                rows_written.extend(fresh)
    state.wait_for_everyone()
    return rows_written
