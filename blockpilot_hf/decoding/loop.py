"""The decoding loop: `speculative_generate`, a transformers `custom_generate` callable.

One step, for every sequence of the batch at once (numbered like transformers' `_assisted_decoding`):

1. block   - `[last committed token, proposals...]` at the next free cache slots;
2. verify  - one target forward over the block (`VerifyStep`); logits processors run per position with the prefix
             that position would have seen;
3. accept  - the target picks its own token at every position (argmax, or a sample of its processed distribution);
             proposals are accepted while they equal the target's picks, then the target's next pick is committed;
4. commit  - on the host, one token at a time, so stopping criteria, EOS and streamers see exactly what plain
             `generate` would; this is the step's only device-to-host synchronisation;
5. draft   - rejected slots become holes in the static caches (masked, later overwritten or compacted), the drafter
             takes the target features of the accepted rows and proposes the next block (`DraftStep`).

With `prompt_lookup_num_tokens` the block also holds a second chain, tokens copied from the context
(`context_copy.ContextCopyProposer`): both chains share the anchor and are verified in the same forward as a tree
(`tree.VerifyTree`), and acceptance walks the tree node by node (`tree.walk`).

Accepting a point-mass (argmax) proposal iff it equals the target's sample is exact speculative sampling: every
committed token is distributed as the target's own processed distribution given its prefix. With greedy decoding the
output is the target's greedy output, token for token, row by row.

In a batch, once at most half the rows still run, those move to a smaller workspace (same slots, their cache rows
copied), so finished rows stop costing compute; that happens at most log2(batch) times per request.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from ..compat import output_cache_kwargs
from ..features import PrefillRepresentation
from ..modeling_drafter import DFlashDrafter
from .context_copy import DEFAULT_MAX_NGRAM, ContextCopyProposer
from .requests import (
    check_drafter_matches_target,
    check_generation_request,
    copy_settings,
    host_stopping,
    pad_token_id,
    policy_copy_tokens,
    resolve_backend,
    resolve_block_sizes,
    sampling_temperature,
)
from .steps import process_rows, processors_per_row, select_tokens
from .tree import walk
from .workspace import cache_capacity, workspace_for

logger = logging.get_logger(__name__)


@dataclass
class BlockPilotGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus speculative-decoding statistics. The cache field is `None`: the loop's static
    caches hold masked holes and are reused by the next request, so they cannot seed a continuation.

    Attributes:
        acceptance_lengths (`list[list[int]]`): per sequence, the tokens committed at every decoding step
            (accepted proposals + 1). The first new token comes from prefill and is not a step, so a sequence's
            generated length is `1 + sum(acceptance_lengths[i])`.
        block_sizes (`list[int]`): per sequence, the block size used (chosen by the policy when one is given).
        copy_tokens (`int`): the length of the copy chain verified beside each block (`prompt_lookup_num_tokens`, or
            the policy's choice; 0: none).
    """

    acceptance_lengths: list[list[int]] | None = None
    block_sizes: list[int] | None = None
    copy_tokens: int | None = None


class CommittedTokens:
    """A request's output on the host, row by row: the tokens so far (padded prompt included, as plain `generate`
    counts them), which rows finished, the tokens committed per step, and scores/logits when asked for. `commit`
    applies the stopping criteria token by token, as plain decoding does."""

    def __init__(self, input_ids, stopping_criteria, generation_config: GenerationConfig, streamer):
        self.sequences = input_ids.tolist()
        self.finished = [False] * len(self.sequences)
        # Plain `generate` pads a row its criteria stopped only when an EOS criterion is present; without one, every
        # row keeps generating until all have stopped, and all end at the length where the last one stopped.
        self.pads_stopped_rows = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        self.stopped_at: list[int | None] = [None] * len(self.sequences)
        self.end_length: int | None = None
        self.max_length = generation_config.max_length
        self.acceptance_lengths = [[] for _ in self.sequences]
        self.output_scores = bool(generation_config.output_scores)
        self.output_logits = bool(generation_config.output_logits)
        self.scores = [[] for _ in self.sequences]
        self.logits = [[] for _ in self.sequences]
        self.stopping_criteria, self.streamer, self.device = stopping_criteria, streamer, input_ids.device
        self.host_stopping = host_stopping(stopping_criteria)  # None: criteria need the device
        if streamer is not None:
            if len(self.sequences) != 1:
                raise ValueError(
                    f"Streamers take one sequence, as in transformers; got a batch of {len(self.sequences)}."
                )
            streamer.put(input_ids.cpu())

    def all_finished(self) -> bool:
        return all(self.finished)

    def commit(self, row: int, tokens: list[int], token_scores: torch.Tensor, token_logits: torch.Tensor) -> int:
        """Append tokens one at a time, as plain decoding would; returns how many were committed."""
        for k, token in enumerate(tokens):
            self.sequences[row].append(token)
            # clones: with CUDA graphs the step's outputs are overwritten by the next replay
            if self.output_scores:
                self.scores[row].append(token_scores[k].clone())
            if self.output_logits:
                self.logits[row].append(token_logits[k].clone())
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            if self.stopped_at[row] is None and self._stops(row, token, token_scores[k]):
                self.stopped_at[row] = len(self.sequences[row])
                if self.pads_stopped_rows:
                    self.finished[row] = True
                    return k + 1
                if all(length is not None for length in self.stopped_at):
                    self._end_all_at(max(self.stopped_at))
            length = len(self.sequences[row])
            # (A stopped row at the maximum length has nothing more to add before the others stop.)
            if length >= (self.end_length or self.max_length or float("inf")) and self.stopped_at[row] is not None:
                self.finished[row] = True
                return k + 1
        return len(tokens)

    def _end_all_at(self, length: int) -> None:
        """Every row ends at `length` tokens, as plain `generate` ends rows it does not pad: rows already past it
        lose what they committed beyond (and their step statistics with it)."""
        self.end_length = length
        for row, sequence in enumerate(self.sequences):
            extra = len(sequence) - length
            if extra < 0:
                continue
            self.finished[row] = True
            del sequence[length:]
            del self.scores[row][len(self.scores[row]) - extra :]
            del self.logits[row][len(self.logits[row]) - extra :]
            steps = self.acceptance_lengths[row]
            while extra:
                cut = min(extra, steps[-1])
                steps[-1] -= cut
                extra -= cut
                if steps[-1] == 0:
                    steps.pop()

    def _stops(self, row: int, token: int, token_scores: torch.Tensor) -> bool:
        if self.host_stopping is None:
            ids = torch.tensor([self.sequences[row]], device=self.device)
            return bool(self.stopping_criteria(ids, token_scores[None]).any())
        eos, max_length, max_positions = self.host_stopping
        length = len(self.sequences[row])
        stop = token in eos or (max_length is not None and length >= max_length)
        return stop or (max_positions is not None and length > max_positions)

    def output(self, generation_config: GenerationConfig, block_sizes: list[int], copy_tokens: int = 0):
        if self.streamer is not None:
            self.streamer.end()
        pad = pad_token_id(generation_config)
        longest = max(len(row) for row in self.sequences)
        output_ids = torch.tensor([row + [pad] * (longest - len(row)) for row in self.sequences], device=self.device)
        if not generation_config.return_dict_in_generate:
            return output_ids
        return BlockPilotGenerateOutput(
            sequences=output_ids,
            scores=_stack_per_step(self.scores) if self.output_scores else None,
            logits=_stack_per_step(self.logits) if self.output_logits else None,
            # No cache: it holds masked holes and belongs to a workspace the next request reuses, so continuing from
            # it would be silently wrong.
            **output_cache_kwargs(BlockPilotGenerateOutput, None),
            acceptance_lengths=self.acceptance_lengths,
            block_sizes=block_sizes,
            copy_tokens=copy_tokens,
        )


class SpeculativeBatch:
    """The device side of a request: the workspace (caches, slot mask, steps) of the rows still running, the block
    size, the next free slot, and each workspace row's anchor (its last committed token). With a copy chain, each
    verify block also holds that many tokens copied from the context (`max_ngram`: the longest suffix matched):
    `copy_tokens` where the request set it, else as the block policy chooses after prefill (`None`)."""

    def __init__(
        self,
        model,
        drafter,
        input_ids,
        attention_mask,
        block_policy,
        use_graphs: bool,
        max_length: int,
        copy_tokens: int | None = 0,
        max_ngram: int = DEFAULT_MAX_NGRAM,
        temperature: float = 0.0,
    ):
        self.model, self.drafter, self.use_graphs, self.device = model, drafter, use_graphs, input_ids.device
        self.max_ngram = max_ngram
        # The longest chain this request may verify, known before prefill: the caches must hold it.
        most_copied = copy_tokens if copy_tokens is not None else policy_copy_tokens(block_policy)
        batch_size, prompt_length = input_ids.shape
        prompt_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        real_prompt_lengths = prompt_mask.sum(dim=-1)
        # Where each row's real tokens begin, for the copy chain (left padding is never copied); read on the host
        # only when there is one.
        self.prompt_starts = prompt_mask.int().argmax(dim=-1).tolist() if most_copied else None
        # Caches are sized for the largest block the drafter allows, so whatever size the policy picks fits.
        max_new_tokens = max(max_length - prompt_length, 1)
        look_ahead = drafter.config.max_block_size + most_copied
        capacity = cache_capacity(prompt_length, max_new_tokens, look_ahead, batch_size)
        self.workspace = workspace_for(model, drafter, batch_size, capacity, use_graphs)
        self.workspace.reset(prompt_mask)
        # Prefill: the first new token, the policy's input and the drafter's first context, from one target forward.
        self.prefill_logits, self.prompt_features, last_hidden = self.workspace.prefill(
            input_ids, prompt_positions, drafter.config.target_layer_ids
        )
        prefill = PrefillRepresentation(self.prefill_logits, last_hidden, real_prompt_lengths, temperature)
        self.block_sizes, self.copy_tokens = resolve_block_sizes(block_policy, drafter, prefill, copy_tokens)
        self.row_block_sizes = self.block_sizes.tolist()
        # One verify shape for the batch; each sequence accepts at most its own size.
        self.block_size = int(self.block_sizes.max())
        self.verify, self.draft = self.workspace.steps(self.block_size, self.copy_tokens)
        self.tree = self.verify.tree
        self.workspace.row_block_sizes.copy_(self.block_sizes)
        self.rows = list(range(batch_size))  # the request row of each workspace row; shrinks as rows finish
        self.offset = prompt_length  # the slot where the next verified block starts
        self.prompt_positions, self.real_prompt_lengths = prompt_positions, real_prompt_lengths
        self.copier, self.copied = None, [[] for _ in range(batch_size)]

    def start(self, first_tokens: list[int], committed: "CommittedTokens") -> None:
        """The first anchors (the tokens prefill committed) and, from the prompt's features, the first proposals."""
        if self.copy_tokens:
            self.copier = ContextCopyProposer(
                committed.sequences, self.prompt_starts, self.copy_tokens, self.max_ngram
            )
        self.anchors = first_tokens
        self.draft.anchor_ids.copy_(torch.tensor(first_tokens, device=self.device)[:, None])
        self.draft.anchor_positions.copy_(self.real_prompt_lengths[:, None])
        if self.block_size > 1:
            self.draft.place(0, self.prompt_positions.shape[1])  # the prompt's features are the first context
            self.proposals = self.draft.run(self.prompt_features, self.prompt_positions, self.draft.context_offset)
        del self.prompt_features

    @property
    def offset_device(self) -> torch.device:
        return self.workspace.slot_valid.device

    def verify_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1 and 2: the block `[anchor, proposals..., copied...]` at slots `offset...`, verified; `(logits,
        features)`."""
        if self.offset + self.tree.length > self.workspace.capacity:
            self.offset = self.workspace.compact()
        self.verify.block_ids[:, :1].copy_(self.draft.anchor_ids)
        if self.block_size > 1:
            self.verify.block_ids[:, 1 : self.block_size].copy_(self.proposals)
        if self.copier is not None:
            for row in self.rows:
                self.copier.update(row)
            self.copied = [self.copier.propose(row) for row in self.rows]
            padded = [tokens + [0] * (self.copy_tokens - len(tokens)) for tokens in self.copied]  # (never accepted)
            self.verify.block_ids[:, self.block_size :].copy_(torch.tensor(padded), non_blocking=True)
        self.verify.position_ids.copy_(self.draft.anchor_positions + self.verify.position_offsets)
        self.verify.place(self.offset)
        block_logits, block_features, self.greedy_tokens = self.verify()
        return block_logits, block_features

    def keep(self, kept_slots: list[list[int]], committed: CommittedTokens) -> None:
        """Step 5, first half: row `i` keeps the block slots `kept_slots[i]` (anchor + accepted proposals; none for a
        finished row); the rest become holes. The committed tokens' last one becomes each running row's anchor."""
        kept = torch.zeros(len(self.rows), self.tree.length, dtype=torch.bool)
        for i, slots in enumerate(kept_slots):
            kept[i, slots] = True
        counts = [len(slots) for slots in kept_slots]
        # Finished rows keep their last anchor and position (and draft junk nobody reads) so their state stays consistent.
        self.anchors = [
            committed.sequences[row][-1] if counts[i] else self.anchors[i] for i, row in enumerate(self.rows)
        ]
        self.workspace.slot_valid[:, self.offset : self.offset + self.tree.length] = kept.to(self.device)
        self.draft.anchor_ids.copy_(torch.tensor(self.anchors, device=self.device)[:, None])
        self.draft.anchor_positions.add_(torch.tensor(counts, device=self.device)[:, None])
        self.kept = [max(slots) + 1 if slots else 0 for slots in kept_slots]  # slots the next block must not reuse

    def shrink(self, running: list[int], block_features: torch.Tensor) -> torch.Tensor:
        """Continue only workspace rows `running` in a smaller workspace (same capacity, so every slot keeps its
        number); returns their block features."""
        index = torch.tensor(running, device=self.device)
        smaller = workspace_for(self.model, self.drafter, len(running), self.workspace.capacity, self.use_graphs)
        smaller.take_rows(self.workspace, index)
        verify, draft = smaller.steps(self.block_size, self.copy_tokens)
        draft.anchor_ids.copy_(self.draft.anchor_ids[index])
        draft.anchor_positions.copy_(self.draft.anchor_positions[index])
        verify.position_ids.copy_(self.verify.position_ids[index])  # the verified block's positions, for the draft
        self.workspace, self.verify, self.draft = smaller, verify, draft
        self.rows = [self.rows[i] for i in running]
        self.anchors, self.kept = [self.anchors[i] for i in running], [self.kept[i] for i in running]
        self.copied = [self.copied[i] for i in running]
        return block_features[index]

    def draft_next(self, block_features: torch.Tensor) -> None:
        """Step 5, second half: the drafter takes the verified block's features and proposes the next block."""
        if self.block_size > 1:
            self.draft.context.copy_(block_features)
            self.draft.context_positions.copy_(self.verify.position_ids)
            self.draft.place(self.offset, self.tree.length)
            self.proposals = self.draft()
        self.offset += max(self.kept)


def accept(batch: SpeculativeBatch, committed: CommittedTokens, target_tokens, block_scores, block_logits, max_length):
    """Steps 3 and 4 on the host: per running row, the walk through its block (`tree.walk`: proposals are accepted
    while they equal the target's picks, never past the row's own block size nor `max_length`), committed with the
    target's next pick. Returns, per workspace row, the block slots that enter the caches (none for a row that
    finished)."""
    tree, block_size = batch.tree, batch.block_size
    host = torch.cat([batch.verify.block_ids, target_tokens], dim=1).tolist()  # the one sync
    first_slots = [1, block_size]  # the drafter's chain, then the copy's (`tree.VerifyTree`)
    kept = [[] for _ in batch.rows]
    for i, row in enumerate(batch.rows):
        if committed.finished[row]:
            continue
        block, picks = host[i][: tree.length], host[i][tree.length :]
        room = max(0, max_length - len(committed.sequences[row]) - 1)
        branches = [block[1 : batch.row_block_sizes[row]][:room], batch.copied[i][:room]]
        tokens, slots = walk(branches, picks.__getitem__, first_slots)
        scores, logits = block_scores[i], block_logits[i]
        if slots[-1] != len(slots) - 1:  # a walk off the first chain: each token's scores are its node's
            scores, logits = scores[slots], logits[slots]
        committed.acceptance_lengths[row].append(committed.commit(row, tokens, scores, logits))
        if not committed.finished[row]:
            kept[i] = slots  # anchor + accepted proposals enter the caches
    # (A row may have finished after its turn: the last of the others to stop ended every row.)
    return [slots if not committed.finished[row] else [] for slots, row in zip(kept, batch.rows)]


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config: GenerationConfig | None = None,
    drafter: DFlashDrafter | None = None,
    block_policy=None,
    token_streamer=None,
    decoding_backend: str = "auto",
    **model_kwargs,
):
    """Block-diffusion speculative decoding as a transformers `custom_generate` callable.

    Use it as `target.generate(input_ids, custom_generate=speculative_generate, drafter=drafter, block_policy=...)`;
    `generate` prepares the generation config, logits processors and stopping criteria and calls this function.
    (transformers never forwards `assistant_model` or `streamer` to a callable, hence `drafter` and `token_streamer`;
    `blockpilot_hf.enable(target)` lets you write `assistant_model=` and `streamer=` as usual.)

    Args:
        drafter (`DFlashDrafter`): the drafter.
        block_policy (`None`, `int` or `BlockSizePolicy`): block size, fixed or chosen per sequence after prefill;
            a policy with a copy chain also chooses whether to copy, unless `prompt_lookup_num_tokens` is set.
        token_streamer (`BaseStreamer`, *optional*): receives the prompt, then exactly the committed tokens in order
            (batch size 1, like transformers' streamers).
        decoding_backend (`str`): `"auto"` replays the draft and verify steps as CUDA graphs on a CUDA target and runs
            them eagerly elsewhere; `"eager"` never captures; `"cuda_graphs"` requires CUDA. Outputs are identical.

    Returns:
        `torch.LongTensor` of shape `(batch, length)` (left-padded prompts, finished rows padded with the pad token,
        as plain `generate` returns them), or a [`BlockPilotGenerateOutput`] with `return_dict_in_generate=True`.
    """
    if drafter is None:
        raise ValueError(
            "speculative_generate needs `drafter=`: pass your DFlashDrafter (transformers does not forward "
            "`assistant_model` to custom_generate callables), or call `blockpilot_hf.enable(target)` first."
        )
    generation_config = generation_config if generation_config is not None else model.generation_config
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    check_drafter_matches_target(drafter, model)
    check_generation_request(model, drafter, input_ids, generation_config, model_kwargs)
    use_graphs = resolve_backend(decoding_backend, model.device)
    do_sample, max_length = bool(generation_config.do_sample), generation_config.max_length
    copy_tokens, max_ngram = copy_settings(generation_config)
    committed = CommittedTokens(input_ids, stopping_criteria, generation_config, token_streamer)

    batch = SpeculativeBatch(
        model,
        drafter,
        input_ids,
        model_kwargs.get("attention_mask"),
        block_policy,
        use_graphs,
        max_length,
        copy_tokens,
        max_ngram,
        sampling_temperature(generation_config),
    )
    first_scores = logits_processor(input_ids, batch.prefill_logits)
    first_tokens = select_tokens(first_scores, do_sample).tolist()
    for row, token in enumerate(first_tokens):
        committed.commit(row, [token], first_scores[row : row + 1], batch.prefill_logits[row : row + 1])
    batch.start(first_tokens, committed)
    row_processors = processors_per_row(logits_processor, len(first_tokens))
    needs_processing = len(logits_processor) > 0 or do_sample

    while not committed.all_finished():
        block_logits, block_features = batch.verify_block()  # 1. block, 2. verify
        if needs_processing:
            prefixes = [committed.sequences[row] for row in batch.rows]
            block_scores = process_rows(
                [row_processors[r] for r in batch.rows], prefixes, batch.verify.block_ids, block_logits, batch.tree
            )
            target_tokens = select_tokens(block_scores, do_sample)
        else:
            block_scores, target_tokens = block_logits, batch.greedy_tokens
        kept = accept(batch, committed, target_tokens, block_scores, block_logits, max_length)  # 3. accept, 4. commit
        if committed.all_finished():
            break
        batch.keep(kept, committed)  # 5. draft: rejected slots become holes, then the next proposals
        running = [i for i, row in enumerate(batch.rows) if not committed.finished[row]]
        if len(running) <= len(batch.rows) // 2:
            # Most rows are done: the others continue in a smaller batch (plain `generate` keeps computing them all).
            block_features = batch.shrink(running, block_features)
        batch.draft_next(block_features)

    return committed.output(generation_config, batch.block_sizes.tolist(), batch.copy_tokens)


def _stack_per_step(per_row: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Per-token tuples `(batch, vocab)` as plain generate returns them; rows that finished earlier hold zeros."""
    steps = max(len(row) for row in per_row)
    template = next(row[0] for row in per_row if row)
    return tuple(
        torch.stack([row[t] if t < len(row) else torch.zeros_like(template) for row in per_row]) for t in range(steps)
    )
