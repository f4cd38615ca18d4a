"""Plain (no drafter) batched decoding of the target for bulk data: greedy or temperature sampling, nothing else.

Training data is the target's own output on tens of thousands of prompts, so this decoder is built for throughput
rather than for every `generate` option: one static cache preallocated for the batch, one target forward per step
that reads only the slots in use, sampling on the device (a cumulative sum and a binary search, no sort over the
vocabulary), and a look at the host only every few steps to see whether the batch is done. Once an eighth of the rows
have ended, the others continue in a smaller batch (a copy of their cache rows), so rows that ended stop costing
compute: most responses run to the token limit while the rest end early, and waiting for half of them to end left a
fifth of the row-steps of the scale data's batches spent on rows already done (simulated on its response lengths).

Rows of one batch may answer the same prompt (a greedy response and sampled copies): each distinct prompt is
prefilled once and its cache rows copied to the rows that answer it: a third of a batch's time was prefill, and
regenerate's batches hold each prompt twice. Prompts are prefilled a few thousand tokens at a time, each chunk
padded to its own longest prompt: over a whole batch at once the element-wise work (norms, rotary, SiLU) runs on
tensors far larger than the CPU's caches, and 16 rows of ~230 tokens per forward ran 1.47x the tokens per second of
64 (docs/performance.md has the measurements).

Greedy rows are the target's greedy output in the dtype it runs in; sampled rows are drawn from
`softmax(logits / temperature)`, the target's raw distribution at that temperature.

The forwards that decode a row also compute the hidden states a drafter trains on, so with `feature_layer_ids` they
are kept (prompt positions from the prefill, each response token from the step that feeds it): a drafter's feature
store then needs no second target pass over its rows, which took over a quarter of the time of making drafter data.
"""

import contextlib
from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..compat import copy_cache_rows, new_static_cache, place_cache_rows
from ..cpu_linear import decoding_linear_form
from ..decoding.requests import cut_at_eos
from ..decoding.steps import target_block_forward
from .feature_store import STORAGE_DTYPE as FEATURE_DTYPE


def pick_tokens(
    logits: torch.Tensor, temperature: float | torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Per row of `logits`, its argmax where the temperature is `None` or 0, else one sample of
    `softmax(logits / temperature)`. `temperature` is one value for every row or a tensor of one per row (0: greedy).

    Sampling inverts the cumulative distribution: one uniform draw per row, found by binary search in the running sum
    of the probabilities. An exponential race (`argmax(p / E)`, one `E ~ Exp(1)` per token) draws the same
    distribution with one random number per vocabulary entry: 125 ms a step for 64 rows of SmolLM2's 49,152 tokens on
    one CPU thread, against 9 ms for the cumulative sum (`results/current/drafter_data/sampler.json`). The argmax is
    `max(...).indices` (the first maximum too): over 64 rows in bf16 on one thread 4.9 ms against `argmax`'s 13.7
    (`results/archive/probes/bf16_argmax_cpu.json`)."""
    if not torch.is_tensor(temperature):
        if not temperature:
            return logits.max(dim=-1).indices
        temperature = torch.full(logits.shape[:1], float(temperature), device=logits.device)
    picks = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = (temperature <= 0).nonzero().squeeze(1)
    sampled = (temperature > 0).nonzero().squeeze(1)
    if len(greedy):
        picks[greedy] = logits[greedy].max(dim=-1).indices
    if len(sampled):
        probs = torch.softmax(logits[sampled].float() / temperature[sampled, None], dim=-1)
        cumulative = probs.cumsum(dim=-1)
        total = cumulative[:, -1:]
        draw = torch.rand(total.shape, generator=generator, device=logits.device) * total
        # Strictly below the total, and searched on the right: a token of probability 0 has no share of [0, total).
        draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))
        picks[sampled] = torch.searchsorted(cumulative, draw, right=True).squeeze(1)
    return picks


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention under an additive mask in which each key/value head is multiplied once with all the query heads that
    share it, `(heads per group x queries, head dim) @ (head dim, keys)`, softmax in fp32; SDPA where there is no mask
    to apply (its causal default), with dropout, soft-capping or attention sinks.

    On CPU, SDPA's kernel loses much of a bulk decode step to per-head overhead: at batch 64 of SmolLM2 in bf16 on one
    thread, a whole step (every layer, the products too) took 129 / 215 / 318 ms with it at 150 / 450 / 700 keys,
    101 / 163 / 241 ms with this (`results/current/drafter_data/decode_attention.json`). Prefill over a chunk of
    prompts repeats SDPA's key/value heads for every query head first; here they are read once per group
    (`results/current/drafter_data/prefill_attention.json`). The products round to the dtype before the softmax, as
    transformers' eager attention does: as far from the fp32 target as SDPA in bf16 is (both files)."""
    plain = attention_mask is not None and not dropout and kwargs.get("softcap") is None
    if not plain or getattr(module, "sinks", None) is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, queries, head_dim = query.shape
    groups = key.shape[1]
    grouped_queries = query.reshape(batch, groups, heads // groups * queries, head_dim)
    # The keys are the first slots of a longer static cache: a batched product with the transpose of such a view
    # takes a slow path on CPU (~40x slower than with a copy), the values' product does not.
    scores = torch.matmul(grouped_queries, key.contiguous().transpose(-1, -2))
    scores = scores.view(batch, heads, queries, -1).float() * (head_dim**-0.5 if scaling is None else scaling)
    scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    output = torch.matmul(probs.view(batch, groups, heads // groups * queries, -1), value)
    return output.view(batch, heads, queries, head_dim).transpose(1, 2).contiguous(), None


GROUPED_ATTENTION = "blockpilot_grouped"
AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)


@contextlib.contextmanager
def bulk_attention(target):
    """Runs a CPU target that attends with SDPA on `grouped_attention` inside the block; others as they are."""
    if target.device.type != "cpu" or target.config._attn_implementation != "sdpa":
        yield
        return
    target.set_attn_implementation(GROUPED_ATTENTION)
    try:
        yield
    finally:
        target.set_attn_implementation("sdpa")


def _forward(target, cache, slot_valid, input_ids, position_ids, offset: int, key_length: int, layer_ids=None):
    """`(logits at the last of input_ids, context features of every input or None)`, written at slots `offset...`;
    queries see valid slots up to their own."""
    offset = torch.tensor(offset, device=input_ids.device)
    logits, features, _ = target_block_forward(
        target, cache, slot_valid, input_ids, position_ids, offset, layer_ids, logits_to_keep=1, key_length=key_length
    )
    return logits[:, -1], features


def _prefill_chunks(lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """`(start, stop)` ranges of prompts (sorted by length) whose left-padded chunk holds at most `max_tokens` tokens
    (one prompt at least)."""
    chunks, start = [], 0
    for stop in range(1, len(lengths) + 1):
        if stop == len(lengths) or (stop + 1 - start) * lengths[stop] > max_tokens:
            chunks.append((start, stop))
            start = stop
    return chunks


def _left_padding(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(valid slots, positions)` of prompts of `lengths` left-padded to `width`: `(len(lengths), width)` each."""
    valid = torch.arange(width, device=lengths.device) >= (width - lengths)[:, None]
    return valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(target, prompts: list[tuple[int, ...]], pad_token_id: int, layer_ids=None):
    """`(logits at each prompt's last token, a static cache of the left-padded prompts, each prompt's context
    features or None)`, in one forward."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor(
        [[pad_token_id] * (width - len(ids)) + list(ids) for ids in prompts], device=target.device
    )
    slot_valid, positions = _left_padding(torch.tensor([len(ids) for ids in prompts], device=target.device), width)
    cache = new_static_cache(target.config, width)
    logits, features = _forward(target, cache, slot_valid, input_ids, positions, 0, width, layer_ids)
    if features is not None:
        features = [features[i, width - len(ids) :].to(FEATURE_DTYPE) for i, ids in enumerate(prompts)]
    return logits, cache, features


@torch.no_grad()
def decode_batch(
    target,
    prompts: list[list[int]],
    pad_token_id: int,
    eos_token_ids: set[int],
    max_new_tokens: int,
    temperature: float | None | Sequence[float | None] = None,
    generator: torch.Generator | None = None,
    check_every: int = 8,
    shrink_at: float = 0.875,
    prefill_tokens: int = 4096,
    feature_layer_ids: Sequence[int] | None = None,
) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
    """The target's response to each token-id prompt, cut after its first EOS (`max_new_tokens` at most).

    Prompts are left-padded into one batch; equal prompts are prefilled once, in chunks of similar length of about
    `prefill_tokens` tokens. `temperature` is one value for all rows or one per row; `None` (or 0) decodes that row
    greedily. `generator` seeds sampling. `check_every` is how many steps run between looks at the host (a finished
    batch may run that many extra steps); at a look, once at most `shrink_at` of the batch's rows still run, they
    continue in a batch of their own.

    With `feature_layer_ids`, returns `(responses, features)`: per row, the context features
    (`features.context_features` of those target layers, bf16, on the CPU) of its prompt and response,
    `(len(prompt) + len(response), len(feature_layer_ids) * hidden_size)`, as one forward over the whole row gives
    them up to floating-point rounding. The last token's row is zeros: the decoder ends on a token it never feeds,
    and no training block reads it (a block sees the context before its anchor only).
    """
    device = target.device
    batch = len(prompts)
    if isinstance(temperature, Sequence):
        if len(temperature) != batch:
            raise ValueError(
                f"{len(temperature)} temperatures for {batch} prompts: give one per prompt, or one value."
            )
        temperature = torch.tensor([t or 0.0 for t in temperature], device=device)
    distinct = sorted(dict.fromkeys(tuple(ids) for ids in prompts), key=len)
    index = {ids: i for i, ids in enumerate(distinct)}
    answers = torch.tensor([index[tuple(ids)] for ids in prompts], device=device)  # row -> its distinct prompt
    width = len(distinct[-1])
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)
    capacity = width + max_new_tokens
    cache = new_static_cache(target.config, capacity)
    slot_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
    slot_valid[:, :width], positions = _left_padding(lengths, width)
    eos = torch.tensor(sorted(eos_token_ids), device=device)
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the prompt each running row answers
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = None
    layer_ids = list(feature_layer_ids) if feature_layer_ids is not None else None
    prompt_features, token_features = [], None  # per distinct prompt; per row and step (the token fed at that step)
    if layer_ids is not None:
        feature_size = len(layer_ids) * target.config.get_text_config().hidden_size
        token_features = torch.zeros(batch, max_new_tokens, feature_size, dtype=FEATURE_DTYPE, device=device)
    with decoding_linear_form(device)(), bulk_attention(target):  # products in the decoding loop's form
        for start, stop in _prefill_chunks([len(ids) for ids in distinct], prefill_tokens):
            chunk_logits, chunk_cache, chunk_features = _prefill(target, distinct[start:stop], pad_token_id, layer_ids)
            if chunk_features is not None:
                prompt_features += chunk_features
            answering = ((answers >= start) & (answers < stop)).nonzero().squeeze(1)
            place_cache_rows(
                cache, batch, chunk_cache, answers[answering] - start, answering, width - len(distinct[stop - 1])
            )
            if logits is None:
                logits = chunk_logits.new_empty(batch, chunk_logits.shape[-1])
            logits[answering] = chunk_logits[answers[answering] - start]
        next_position = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            row_temperature = temperature[rows] if torch.is_tensor(temperature) else temperature
            tokens = torch.where(done, pad_token_id, pick_tokens(logits, row_temperature, generator))
            responses[rows, step] = tokens
            done |= torch.isin(tokens, eos)
            if step == max_new_tokens - 1:
                break
            if step % check_every == check_every - 1:
                running = (~done).nonzero().squeeze(1)
                if len(running) == 0:
                    break
                if len(running) <= shrink_at * len(rows):
                    smaller = new_static_cache(target.config, capacity)
                    copy_cache_rows(smaller, cache, running)
                    cache, slot_valid, rows = smaller, slot_valid[running], rows[running]
                    tokens, done, next_position = tokens[running], done[running], next_position[running]
            slot = width + step
            slot_valid[:, slot] = True
            logits, features = _forward(
                target, cache, slot_valid, tokens[:, None], next_position, slot, slot + 1, layer_ids
            )
            if features is not None:
                token_features[rows, step] = features[:, 0].to(FEATURE_DTYPE)
            next_position = next_position + 1
    responses = [cut_at_eos(response, eos_token_ids) for response in responses.tolist()]
    if layer_ids is None:
        return responses
    row_features = []
    for row, response in enumerate(responses):
        # The token picked at step s is fed at step s; the last one never is (zeros, see above).
        fed = token_features[row, : len(response)].clone()
        fed[-1] = 0
        row_features.append(torch.cat([prompt_features[int(answers[row])], fed]).cpu())
    return responses, row_features
