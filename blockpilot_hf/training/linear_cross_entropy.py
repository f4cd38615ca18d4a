"""Cross-entropy through a frozen LM head, a chunk of rows at a time, without keeping the logits.

A drafter training step scores ~16K block positions against a 16K-token draft vocabulary: the logits alone are 1 GB
in fp32, and the log-softmax over them, its backward, the dtype copies and the zero-filled gradient took more time
than the LM head's products (`results/current/training_cost/`). Each row's loss depends on its own hidden state only,
and the LM head is frozen, so the whole gradient of the loss of row `i` with respect to its hidden state,
`(softmax_i - label_i) @ W`, can be computed while its logits are at hand and the logits dropped: backward then only
scales those rows by the incoming per-row gradient. That is exact for any use of the per-row losses (weighting by
confidence, normalising by the weights' sum), since the chain rule through a row only multiplies its gradient.
"""

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, soft_label_hidden, chunk_size):
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        label_losses = torch.empty_like(losses)
        predictions = torch.empty(len(hidden), dtype=torch.long, device=hidden.device)
        needs_gradient = ctx.needs_input_grad[0]  # not when scoring under no_grad
        gradients = torch.empty_like(hidden) if needs_gradient else None
        # The products in the caller's autocast dtype, as the LM head over all rows at once ran them; the head is cast
        # once here rather than by autocast at every chunk (it is no leaf, so autocast would not keep the cast).
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        head = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, len(hidden), chunk_size):
                rows = slice(start, start + chunk_size)
                log_probs = F.linear(hidden[rows].to(dtype), head, bias).log_softmax(-1, dtype=torch.float32)
                label_log_probs = log_probs.gather(1, labels[rows, None]).squeeze(1)
                label_losses[rows] = -label_log_probs
                predictions[rows] = log_probs.argmax(-1)
                if soft_label_hidden is None:
                    losses[rows] = -label_log_probs
                    probs = log_probs.exp_()
                    probs[torch.arange(len(probs), device=probs.device), labels[rows]] -= 1.0
                else:
                    # The target's own distribution q is the label: loss H(q, p), gradient (p - q) @ W.
                    soft_logits = F.linear(soft_label_hidden[rows].to(dtype), head, bias)
                    soft_labels = soft_logits.softmax(-1, dtype=torch.float32)
                    losses[rows] = -(soft_labels * log_probs).sum(-1)
                    probs = log_probs.exp_().sub_(soft_labels)
                    del soft_labels
                if needs_gradient:
                    gradients[rows] = torch.matmul(probs.to(dtype), head).to(gradients.dtype)
                del log_probs, probs
        ctx.save_for_backward(gradients)
        ctx.mark_non_differentiable(label_losses, predictions)
        return losses, label_losses, predictions

    @staticmethod
    def backward(ctx, grad_losses, _grad_label_losses, _grad_predictions):
        (gradients,) = ctx.saved_tensors
        return grad_losses[:, None].to(gradients.dtype) * gradients, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.LongTensor,
    soft_label_hidden: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
    """Per-row cross-entropy of `F.linear(hidden, weight, bias)` against `labels`, differentiable in `hidden` only.

    Args:
        hidden (`torch.Tensor` of shape `(rows, hidden_size)`): what the LM head scores.
        weight (`torch.Tensor` of shape `(vocabulary, hidden_size)`), bias: the LM head (rows of a draft vocabulary
            where the drafter has one), frozen: its gradient is never computed.
        labels (`torch.LongTensor` of shape `(rows,)`): indices into `weight`'s rows.
        soft_label_hidden (`torch.Tensor` of shape `(rows, hidden_size)`, *optional*): when given, the label is the
            distribution `softmax(F.linear(soft_label_hidden, weight, bias))` (the target's own, from its final hidden
            state) and the loss is the cross-entropy to it.
        chunk_size (`int`): rows scored at once; the memory held is `chunk_size x vocabulary` logits.

    Returns:
        `(losses, label_losses, predictions)`: the per-row loss (fp32, differentiable), the per-row cross-entropy to
        `labels` and the argmax of the logits (both without gradient).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(
            "linear_cross_entropy keeps no logits, so it cannot give the LM head a gradient: freeze the head "
            "(`requires_grad_(False)`), as drafter training does with the target's."
        )
    if soft_label_hidden is not None:
        soft_label_hidden = soft_label_hidden.detach()
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, soft_label_hidden, chunk_size)
