"""Fakes for the decoding loop (a fixed block-size policy, a recording streamer, caches small enough to force
compactions) and views into what it keeps on the target between requests."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import blockpilot_hf.decoding as decoding
from blockpilot_hf.cpu_linear import packing_available

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")


class FixedSizes:
    """A `BlockSizePolicy` returning given sizes, one per row (stands in for a learned policy's choice); `calls` holds
    the prefill representation of every call."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.calls = []

    def choose_block_sizes(self, prefill):
        self.calls.append(prefill)
        assert prefill.last_logits.shape[0] == len(self.sizes)
        return torch.tensor(self.sizes)


class CollectingStreamer(BaseStreamer):
    """Records every `put` (as a list of ints) and whether `end` was called."""

    def __init__(self):
        self.puts = []
        self.ended = False

    def put(self, value):
        assert not self.ended, "put after end"
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def tight_caches(monkeypatch, spare_slots: int = 6) -> list:
    """Caches just large enough for the prompt, the new tokens and `spare_slots` more, so that the holes rows leave
    force compactions. Returns a list that gets one entry per `DecodingWorkspace.compact`."""
    # the loop sizes its caches through the name it imported
    monkeypatch.setattr(decoding.loop, "cache_capacity", lambda prompt, new, block, batch: prompt + new + spare_slots)
    compactions = []
    original = decoding.DecodingWorkspace.compact
    monkeypatch.setattr(decoding.DecodingWorkspace, "compact", lambda self: compactions.append(1) or original(self))
    return compactions


def workspaces(target) -> list:
    """The decoding workspaces (`decoding.workspace_for`) kept on `target` by earlier requests."""
    return list(decoding.cached_workspaces(target).values())


def built_steps(target) -> list:
    """Every verify and draft step built in the workspaces kept on `target`."""
    return [step for w in workspaces(target) for pair in w._steps.values() for step in pair]


def use_linear_form(monkeypatch, form) -> None:
    """Steps built from now on run their products in `form` instead of the one `cpu_linear.decoding_linear_form`
    picks for the machine (prefill too)."""
    monkeypatch.setattr(decoding.workspace, "decoding_linear_form", lambda device: form)


def forget_workspaces(target) -> None:
    """Drop the workspaces kept on `target`: the next request builds its steps afresh."""
    target.__dict__.pop("_blockpilot_workspaces", None)
