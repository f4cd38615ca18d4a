"""Test-only drafters that "copy the target": block position k of a block anchored at p proposes the target's own
greedy token at p+k (optionally corrupted at fixed positions), so acceptance is known exactly in advance."""

import torch

from blockpilot_hf import DFlashDrafter

from helpers.models import greedy_reference, make_drafter


def token_hidden_table(lm_head: torch.nn.Linear, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token t, a hidden vector h_t with `argmax(lm_head(h_t)) == t` where one exists.

    Start from the least-squares solution of `W h = 10 * onehot(t) - bias` (`W` is the LM head weight, vocab x hidden,
    usually overdetermined), then refine all rows at once with a few steps of cross-entropy descent. Returns the
    `(vocab, hidden)` table and a boolean mask of the tokens whose construction provably yields the right argmax
    (with a margin, so fp noise cannot flip it).
    """
    weight = lm_head.weight.detach().float()
    bias = lm_head.bias.detach().float() if lm_head.bias is not None else torch.zeros(weight.shape[0])
    vocab = weight.shape[0]
    targets = 10.0 * torch.eye(vocab) - bias[None, :]  # (vocab tokens, vocab logits)
    table = torch.linalg.lstsq(weight, targets.T).solution.T.contiguous()  # (vocab, hidden)
    table = table.clone().requires_grad_(True)
    opt = torch.optim.Adam([table], lr=0.05)
    labels = torch.arange(vocab)
    with torch.enable_grad():
        for _ in range(steps):
            logits = table @ weight.T + bias
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    table = table.detach()
    logits = lm_head(table.to(lm_head.weight.dtype)).float()
    top2 = logits.topk(2, dim=-1)
    achievable = (top2.indices[:, 0] == labels) & (top2.values[:, 0] - top2.values[:, 1] > 1e-3)
    return table, achievable


class OracleDrafter(DFlashDrafter):
    """Test-only drafter that "copies the target": block position k of a block anchored at p proposes `reference[p+k]`.

    It runs the real drafter forward (so the draft KV cache is maintained exactly as in production) and then replaces
    the output hidden states with vectors whose target-LM-head argmax is the wanted token (see `token_hidden_table`).

    * `corrupt_fraction`: a deterministic pseudo-random fraction of (anchor, k) pairs proposes a wrong token, so
      partial-acceptance paths are exercised (the same pair is always corrupted, whatever the block size);
    * `fixed_token`: the "bad" drafter, always proposing that token.
    """

    def setup_oracle(self, target, reference=None, corrupt_fraction: float = 0.0, salt: int = 0, fixed_token=None):
        table, achievable = token_hidden_table(target.get_output_embeddings())
        self._table = table
        self._achievable = achievable
        # one reference row per batch row, indexed by real position (padding removed)
        self._references = None if reference is None else [row.clone() for row in reference]
        self._corrupt_fraction = corrupt_fraction
        self._salt = salt
        self._fixed_token = fixed_token
        self.oracle_calls = []  # (anchor position, proposed tokens) per call
        if reference is not None:
            missing = [t for row in self._references for t in row.tolist() if not achievable[t]]
            assert not missing, f"oracle construction failed for reference tokens {missing}"
        if fixed_token is not None:
            assert achievable[fixed_token], f"oracle construction failed for fixed token {fixed_token}"
        return self

    def _corrupted(self, anchor: int, k: int) -> bool:
        if self._corrupt_fraction <= 0:
            return False
        h = (anchor * 2654435761 + k * 40503 + self._salt * 97) % 1000
        return h < self._corrupt_fraction * 1000

    def _wrong_token(self, good: int, anchor: int, k: int) -> int:
        candidates = [t for t in range(self._table.shape[0]) if self._achievable[t] and t != good]
        return candidates[(anchor * 31 + k * 7 + self._salt) % len(candidates)]

    def wanted_tokens(self, anchor: int, block_len: int, row: int = 0) -> list[int]:
        tokens = []
        for k in range(block_len):
            if self._fixed_token is not None:
                tokens.append(self._fixed_token)
                continue
            pos = anchor + k
            reference = self._references[row]
            good = int(reference[pos]) if pos < reference.shape[0] else int(reference[-1])
            if k > 0 and self._corrupted(anchor, k):
                good = self._wrong_token(good, anchor, k)
            tokens.append(good)
        return tokens

    def forward(self, noise_embeds, context_hidden_states=None, position_ids=None, **kwargs):
        out = super().forward(noise_embeds, context_hidden_states=context_hidden_states, position_ids=position_ids, **kwargs)
        self.real_hidden = out.last_hidden_state.detach().clone()  # what the real drafter computed, before the swap
        block_len = noise_embeds.shape[1]
        rows = []
        for row in range(noise_embeds.shape[0]):
            anchor = int(position_ids[row, -block_len])
            tokens = self.wanted_tokens(anchor, block_len, row)
            if row == 0:
                self.oracle_calls.append((anchor, tokens[1:]))
            rows.append(tokens)
        hidden = self._table[torch.tensor(rows)].to(out.last_hidden_state.dtype)
        out.last_hidden_state = hidden.to(out.last_hidden_state.device)
        return out


def make_oracle(
    target, input_ids, max_new_tokens: int, block_size: int = 4, corrupt_fraction: float = 0.0, salt=0, **generate_kwargs
):
    """An oracle drafter for `target` on `input_ids`, copying the plain greedy continuation (with enough margin for
    blocks running past the end). `generate_kwargs` (e.g. `repetition_penalty`) shape that continuation. For a batch,
    each row's reference is computed alone from its unpadded prompt (`attention_mask` marks the padding)."""
    mask = generate_kwargs.pop("attention_mask", None)
    rows = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row : row + 1] if mask is None else input_ids[row : row + 1, mask[row].bool()]
        rows.append(greedy_reference(target, ids, max_new_tokens + 24, **generate_kwargs)[0])
    reference = rows
    drafter = make_drafter(target, block_size=block_size, cls=OracleDrafter)
    return drafter.setup_oracle(target, reference, corrupt_fraction=corrupt_fraction, salt=salt)


def make_bad_drafter(target, fixed_token: int = 3, block_size: int = 4):
    drafter = make_drafter(target, block_size=block_size, cls=OracleDrafter)
    return drafter.setup_oracle(target, None, fixed_token=fixed_token)
