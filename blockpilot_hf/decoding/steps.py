"""The pure pieces of a decoding step: the target's picks, the accepted prefix, logits processing per block position,
and the target's forward over a block written into static cache slots.

Both models keep preallocated (static) KV caches whose slots are shared by every sequence of a batch: a verification
writes each sequence's block at the same slots `[offset, offset + block)`, and sequences that accept fewer tokens
than the best one leave holes there. `slot_valid[b, s]` says whether slot `s` holds a committed token of sequence
`b`; masks are built from it, so holes, left padding and rejected drafts are never attended to. Slot `s` of the
drafter cache holds the drafter's keys for the target features of slot `s`, so one `slot_valid` serves both. When
holes fill the cache, `DecodingWorkspace.compact` moves every sequence's valid slots to the front.
"""

import copy

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from ..compat import (
    attention_layer_types,
    cache_kwargs,
    readable_length,
    set_cache_length,
    sliding_window,
    static_cache_prefix,
)
from ..features import context_features


def select_tokens(scores: torch.Tensor, do_sample: bool) -> torch.LongTensor:
    """The target's pick at every position: argmax, or one sample of `softmax(scores)` (scores already processed).

    Samples by the Gumbel-max trick, `argmax(scores + G)` with `G = -log(-log U)`: exactly a draw of `softmax(scores)`,
    without the softmax and the cumulative sums of `torch.multinomial` (on 2 CPU cores 19.5 against 48.1 ms for the 36
    positions of a batch of 4 trees over a 49K vocabulary). `U` stays inside (0, 1), so every noise term is finite
    and a token with score `-inf` is never drawn."""
    if not do_sample:
        return scores.argmax(dim=-1)
    uniform = torch.rand(scores.shape, device=scores.device, dtype=torch.float32)
    gumbel = uniform.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
    return (scores.float() + gumbel).argmax(dim=-1)


def accepted_prefix_length(proposals: torch.LongTensor, target_tokens: torch.LongTensor) -> torch.LongTensor:
    """Number of leading proposals equal to the target's picks at the same positions, per sequence.

    `proposals` and `target_tokens` have shape `(batch, k)`: proposal j is accepted iff it and every proposal before
    it match.
    """
    matches = (proposals == target_tokens).int()
    return matches.cumprod(dim=-1).sum(dim=-1)


def process_block_scores(
    logits_processor: LogitsProcessorList, candidate_ids: torch.LongTensor, logits: torch.Tensor, start: int
) -> torch.Tensor:
    """Apply logits processors at every block position with the prefix that position would have seen.

    `logits[:, k]` predicts the token at position `start + k`, so its prefix is `candidate_ids[:, : start + k]`.
    Position-dependent processors (repetition penalty, min length, ...) therefore behave as in plain decoding.
    """
    return torch.stack(
        [logits_processor(candidate_ids[:, : start + k], logits[:, k]) for k in range(logits.shape[1])], dim=1
    )


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`0` where a key is visible and the dtype's minimum elsewhere: the mask form both eager and SDPA attention add."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )


def attention_masks(config, visible, slot_valid, query_positions, dtype, key_positions=None):
    """The additive attention mask(s) of a target forward, from what each query may see (`visible`, `(batch, queries,
    slots)`): one 4D mask when every layer attends the same way, else `{layer type: mask}`, the form transformers'
    models with mixed layers (Gemma 2/3, gpt-oss, Qwen2) take prepared masks in. Sliding-window layers also hide
    keys `window` or more positions behind the query; a slot's position is `key_positions` where given, else the
    number of valid slots before it (holes and padding have none)."""
    layer_types = set(attention_layer_types(config))
    masks = {}
    for layer_type in layer_types:
        if layer_type == "sliding_attention":
            if key_positions is None:
                key_positions = slot_valid.long().cumsum(dim=-1) - 1
            in_window = key_positions[:, None, :] > query_positions[:, :, None] - sliding_window(config)
            masks[layer_type] = additive_mask((visible & in_window)[:, None], dtype)
        else:
            masks[layer_type] = additive_mask(visible[:, None], dtype)
    return masks if len(masks) > 1 else next(iter(masks.values()))


def target_block_forward(
    model,
    cache,
    slot_valid,
    input_ids,
    position_ids,
    offset,
    layer_ids,
    logits_to_keep=None,
    key_length=None,
    block_visibility=None,
):
    """Target forward over `input_ids` written at cache slots `offset...`. A query at slot `q` sees the valid slots
    (`slot_valid`) before the block, its sequence's committed tokens, never padding or holes, and within its own block
    (which the caller marks valid) the slots `block_visibility` shows it: `(block, block)` booleans, a tree's
    ancestors (`tree.VerifyTree.visibility`); `None` is the causal chain. Returns `(logits, context features, last
    hidden state)`; with `layer_ids` `None` (no drafter to feed) hidden states are not collected and the last two
    are `None`.

    `key_length` (a host int, at least the block's last slot + 1) limits attention to the first slots; `None` reads
    the whole cache (fixed shapes, for CUDA graphs)."""
    key_length = readable_length(cache, key_length)
    set_cache_length(cache, offset)
    block_length = input_ids.shape[1]
    slots = torch.arange(key_length, device=offset.device)
    key_positions = None
    if block_visibility is None:
        query_slots = offset + torch.arange(block_length, device=offset.device)
        visible = slot_valid[:, None, :key_length] & (slots[None, :] <= query_slots[:, None])[None]
    else:
        in_block = (slots >= offset) & (slots < offset + block_length)
        block_index = (slots - offset).clamp(0, block_length - 1)  # each slot's node in the block
        seen = (slots < offset)[None, :] | (block_visibility[:, block_index] & in_block[None, :])
        visible = slot_valid[:, None, :key_length] & seen[None]
        # Two chains share positions, so a block slot's position is its node's, not a count of valid slots.
        key_positions = torch.where(
            in_block[None, :],
            position_ids[:, block_index],
            slot_valid[:, :key_length].long().cumsum(dim=-1) - 1,
        )
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep is not None else {}
    with static_cache_prefix(cache, key_length):
        outputs = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_masks(
                model.config, visible, slot_valid[:, :key_length], position_ids, model.dtype, key_positions
            ),
            use_cache=True,
            output_hidden_states=layer_ids is not None,
            **cache_kwargs(model, cache),
            **kwargs,
        )
    if layer_ids is None:
        return outputs.logits, None, None
    return outputs.logits, context_features(outputs.hidden_states, layer_ids), outputs.hidden_states[-1][:, -1]


_PER_ROW_PROCESSOR_STATE = {"RepetitionPenaltyLogitsProcessor": ("prompt_ignore_length",)}


def processors_per_row(logits_processor: LogitsProcessorList, batch_size: int) -> list[LogitsProcessorList]:
    """One processor list per row. Rows progress at different speeds, so each is processed with its own prefix;
    processors holding per-row state get a copy with that row's slice."""
    if batch_size == 1:
        return [logits_processor]
    rows = []
    for row in range(batch_size):
        processors = LogitsProcessorList()
        for processor in logits_processor:
            if isinstance(processor, PrefixConstrainedLogitsProcessor):
                raise ValueError(
                    "prefix_allowed_tokens_fn needs the batch index of every row, which a speculative batch cannot "
                    "give row by row; call generate once per sequence."
                )
            names = _PER_ROW_PROCESSOR_STATE.get(type(processor).__name__, ())
            state = {
                n: getattr(processor, n)[row : row + 1] for n in names if torch.is_tensor(getattr(processor, n, None))
            }
            if state:
                processor = copy.copy(processor)
                processor.__dict__.update(state)
            processors.append(processor)
        rows.append(processors)
    return rows


# transformers' processors whose output at a position is a function of that position's scores alone, never of the
# prefix: where they end a processor list (sampling's warpers do), they run once over every position of every row.
_SCORES_ONLY_PROCESSORS = frozenset(
    {
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "LogitNormalization",
    }
)


def scores_only_tail(processors: LogitsProcessorList) -> int:
    """How many processors at the end of `processors` read the scores alone (`_SCORES_ONLY_PROCESSORS`)."""
    count = 0
    while count < len(processors) and type(processors[-1 - count]).__name__ in _SCORES_ONLY_PROCESSORS:
        count += 1
    return count


def process_rows(
    row_processors, sequences: list[list[int]], block_ids: torch.LongTensor, logits: torch.Tensor, tree=None
):
    """Processed scores of every block position of every row, each with the prefix it would have in plain decoding:
    in a `tree.VerifyTree` with a copy chain, a node's prefix is the committed tokens and its own ancestors. The
    processors that read the scores alone and end the list (temperature, top-k, top-p, ...) run once over all
    positions of all rows: the same values, one call instead of one per position."""
    tail = scores_only_tail(row_processors[0])  # every row has the same processors (`processors_per_row`)
    if tail:
        shared_tail = LogitsProcessorList(row_processors[0][len(row_processors[0]) - tail :])
        heads = [LogitsProcessorList(processors[: len(processors) - tail]) for processors in row_processors]
        scores = process_rows(heads, sequences, block_ids, logits, tree) if any(heads) else logits
        flat = scores.reshape(-1, scores.shape[-1])
        return shared_tail(block_ids.new_zeros(flat.shape[0], 1), flat).view(scores.shape)
    chain = tree is None or tree.copy_tokens == 0
    # Each node's ancestors as block indices, the same for every row: made once per step, not once per row.
    paths = (
        None
        if chain
        else [torch.tensor(tree.path(slot), dtype=torch.long, device=block_ids.device) for slot in range(tree.length)]
    )
    rows = []
    for row, tokens in enumerate(sequences):
        committed = torch.tensor([tokens], device=block_ids.device)
        if chain:
            candidate_ids = torch.cat([committed, block_ids[row : row + 1, 1:]], dim=1)
            rows.append(process_block_scores(row_processors[row], candidate_ids, logits[row : row + 1], len(tokens)))
            continue
        scores = []
        for slot, path in enumerate(paths):
            prefix = torch.cat([committed, block_ids[row : row + 1, path]], dim=1)
            scores.append(row_processors[row](prefix, logits[row : row + 1, slot]))
        rows.append(torch.stack(scores, dim=1))
    return torch.cat(rows, dim=0)
