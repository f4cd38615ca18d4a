"""The drafter loss as computed before `blockpilot_hf.training.linear_cross_entropy`, for the scripts beside this file
that measure the two against each other (they run as scripts, so their own directory is on the import path)."""

import torch.nn.functional as F


def whole_logits_loss(hidden, weight, bias, labels, soft_label_hidden=None):
    """Every row's logits at once, kept for the backward."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses, losses.detach(), logits.argmax(-1)
