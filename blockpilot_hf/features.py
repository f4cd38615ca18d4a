"""What the drafter and the policy read from the target: context features and the prefill representation.

Both are computed from a forward the target runs anyway (prefill or verification): no extra target pass.
"""

import math
from dataclasses import dataclass

import torch


def context_features(hidden_states: tuple[torch.Tensor, ...], target_layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the outputs of the selected target layers on the feature axis.

    `hidden_states` is the tuple a transformers model returns with `output_hidden_states=True`; index 0 is the
    embedding output, so layer `i`'s output is `hidden_states[i + 1]`.

    Returns a tensor of shape `(batch, seq_len, len(target_layer_ids) * hidden_size)`.
    """
    return torch.cat([hidden_states[i + 1] for i in target_layer_ids], dim=-1)


@dataclass
class PrefillRepresentation:
    """The target's view of a request after prefill, handed once to a block policy.

    Attributes:
        last_logits (`torch.FloatTensor` of shape `(batch, vocab_size)`): raw (unprocessed) logits at the last prompt
            position.
        last_hidden_state (`torch.FloatTensor` of shape `(batch, hidden_size)`): final (normed) hidden state at the last
            prompt position.
        prompt_lengths (`torch.LongTensor` of shape `(batch,)`): number of real (non-padding) prompt tokens.
        temperature (`float`): the request's sampling temperature; 0 for greedy decoding. Acceptance falls as it rises
            (a proposal must equal a sample, not the argmax), so a policy that learnt from labels at several
            temperatures predicts for this one.
    """

    last_logits: torch.Tensor
    last_hidden_state: torch.Tensor
    prompt_lengths: torch.LongTensor
    temperature: float = 0.0


def prefill_distribution_features(prefill: PrefillRepresentation) -> torch.Tensor:
    """The BlockPilot paper's feature: the next-token distribution after prefill (vocabulary-wide)."""
    return torch.softmax(prefill.last_logits.float(), dim=-1)


def prefill_summary_features(prefill: PrefillRepresentation, top_k: int = 10) -> torch.Tensor:
    """A compact feature: last hidden state plus statistics of the next-token distribution.

    The statistics say how sure the target is about what comes next (entropy, top-1 and top-k mass) and how long the
    request is; the hidden state says what kind of request it is. Width: `hidden_size + 4`.
    """
    log_probs = torch.log_softmax(prefill.last_logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values
    stats = torch.stack(
        [
            entropy / math.log(probs.shape[-1]),
            top[:, 0],
            top.sum(-1),
            torch.log1p(prefill.prompt_lengths.float()) / 10.0,
        ],
        dim=-1,
    )
    return torch.cat([prefill.last_hidden_state.float(), stats], dim=-1)


def policy_features(prefill: PrefillRepresentation, feature: str, summary_top_k: int = 10) -> torch.Tensor:
    """The feature vector a [`BlockPolicy`] reads, by its config's `feature` name."""
    if feature == "prefill_distribution":
        return prefill_distribution_features(prefill)
    if feature == "prefill_summary":
        return prefill_summary_features(prefill, top_k=summary_top_k)
    raise ValueError(f"Unknown policy feature {feature!r}.")


def policy_feature_size(feature: str, hidden_size: int, vocab_size: int) -> int:
    return vocab_size if feature == "prefill_distribution" else hidden_size + 4
