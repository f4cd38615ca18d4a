"""Acceptance metrics of speculative decoding as plain functions (the `evaluate` module wraps these)."""

from collections import Counter


def mean_tau(acceptance_lengths: list[int]) -> float:
    """Tokens committed per target forward for one sequence (0 when it took no decoding step)."""
    return sum(acceptance_lengths) / max(1, len(acceptance_lengths))


def acceptance_metrics(acceptance_lengths: list[list[int]], block_sizes: list[int] | None = None) -> dict:
    """Summarise per-sequence acceptance lengths (`BlockPilotGenerateOutput.acceptance_lengths`).

    Returns:
        `mean_tau`: tokens committed per target forward, pooled over every step of every sequence;
        `mean_tau_per_sequence`: the average of each sequence's own mean;
        `histogram`: how many steps committed 1, 2, ... tokens;
        `steps`, `tokens`: totals; `full_block_rate`: share of steps that accepted the whole block (needs `block_sizes`).
    """
    steps = [s for seq in acceptance_lengths for s in seq]
    if not steps:
        return {"mean_tau": None, "mean_tau_per_sequence": None, "histogram": {}, "steps": 0, "tokens": 0}
    per_sequence = [mean_tau(seq) for seq in acceptance_lengths if seq]
    result = {
        "mean_tau": sum(steps) / len(steps),
        "mean_tau_per_sequence": sum(per_sequence) / len(per_sequence),
        "histogram": dict(sorted(Counter(steps).items())),
        "steps": len(steps),
        "tokens": sum(steps),
    }
    if block_sizes is not None:
        full = sum(s == b for seq, b in zip(acceptance_lengths, block_sizes) for s in seq)
        result["full_block_rate"] = full / len(steps)
    return result
