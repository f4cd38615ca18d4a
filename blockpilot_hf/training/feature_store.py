"""The target's context features of the training rows, computed once and read back every epoch.

A drafter trains for several epochs on the same rows, with fresh anchors each time; the frozen target gives the same
features every time, so one target forward per row is enough. They are kept as safetensors shards, one bf16 tensor
`(length, len(target_layer_ids) * hidden_size)` per row, named by the row's key (a hash of its tokens). A store grows
with its data: rows added later are computed and appended, rows seen before are read back (memory-mapped).

bf16 halves the bytes of fp32 and is what drafters train in; a row of 768 tokens with two SmolLM2 layers takes 1.8 MB.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..cpu_linear import decoding_linear_form
from ..features import context_features

STORAGE_DTYPE = torch.bfloat16


def row_key(input_ids: list[int]) -> str:
    """The name a row's features are stored under: a hash of its (truncated) tokens."""
    return hashlib.sha1(torch.tensor(input_ids, dtype=torch.int32).numpy().tobytes()).hexdigest()[:20]


def target_fingerprint(target) -> str:
    """What identifies the target whose features a store holds: its name, size and a checksum of two weights."""
    parameters = list(target.parameters())
    checksum = sum(float(p.detach().double().sum()) for p in (parameters[0], parameters[-1]))
    name = getattr(target.config, "_name_or_path", "") or type(target).__name__
    return f"{name}|{sum(p.numel() for p in parameters)}|{checksum:.6e}"


class FeatureStore:
    """Context features of training rows on disk, for one target, one choice of target layers and one `max_length`.

    Args:
        path (`str` or `Path`): the store's directory (made if missing).
        target: the target model the features come from; a store made for another target is refused.
        target_layer_ids (`list[int]`): the target layers whose outputs are concatenated (`features.context_features`).
        max_length (`int`): rows are truncated to this many tokens, as `training.drafter.ResponseDataset` truncates them.
        with_final_hidden_state (`bool`): also keep the target's final (normed) hidden state, appended after the
            context features, from which training with soft targets computes the target's own distribution.
    """

    def __init__(
        self, path, target, target_layer_ids: list[int], max_length: int, with_final_hidden_state: bool = False
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_length = max_length
        self.description = {
            "target": target_fingerprint(target),
            "target_layer_ids": list(target_layer_ids),
            "max_length": max_length,
            "dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        }
        if with_final_hidden_state:  # named only when kept, so stores made before the option still open
            self.description["final_hidden_state"] = True
        index = self.path / "store.json"
        if index.is_file():
            found = json.loads(index.read_text())
            if found != self.description:
                raise ValueError(
                    f"The feature store {self.path} holds features of another setting ({found}); this run needs "
                    f"{self.description}. Give this run its own --feature-store directory (or delete that one)."
                )
        else:
            index.write_text(json.dumps(self.description, indent=1))
        self._shard_of = {}
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                self._shard_of.update(dict.fromkeys(f.keys(), shard))
        self._open = {}

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def get(self, key: str) -> torch.Tensor:
        """The stored features of the row with this key, `(length, feature_size)` in bf16."""
        shard = self._shard_of.get(key)
        if shard is None:
            raise KeyError(f"No features for row {key} in {self.path}: add the rows first (`FeatureStore.add`).")
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), framework="pt")
        return self._open[shard].get_tensor(key)

    def add(self, target, rows: list[dict], tokens_per_batch: int = 8192, rows_per_shard: int = 256) -> int:
        """Compute and store the features of the rows not stored yet; returns how many were added.

        Rows go through the target in batches of similar length (at most `tokens_per_batch` tokens with padding);
        every `rows_per_shard` rows make one shard, written whole (a kill loses at most the shard being made).
        """
        missing = {}
        for row in rows:
            ids = row["input_ids"][: self.max_length]
            key = row_key(ids)
            if key not in self._shard_of:
                missing[key] = ids
        if not missing:
            return 0
        stored_layers = len(self.description["target_layer_ids"]) + self.description.get("final_hidden_state", False)
        feature_size = stored_layers * target.config.get_text_config().hidden_size
        needed = sum(len(ids) for ids in missing.values()) * feature_size * STORAGE_DTYPE.itemsize
        free = shutil.disk_usage(self.path).free
        if needed > 0.95 * free:
            raise ValueError(
                f"The features of {len(missing)} rows need {needed / 2**30:.1f} GiB but {self.path} has "
                f"{free / 2**30:.1f} GiB free: free disk space, put the store elsewhere, or train without one "
                "(the target then recomputes them every epoch)."
            )
        keys = list(missing)
        progress = tqdm(total=len(keys), desc="target features", unit="row")
        for start in range(0, len(keys), rows_per_shard):
            chunk = keys[start : start + rows_per_shard]
            tensors = {}
            for batch in _length_batches(chunk, missing, tokens_per_batch):
                for key, features in zip(batch, self._compute(target, [missing[k] for k in batch])):
                    tensors[key] = features
                progress.update(len(batch))
            shard = self.path / f"shard-{len(list(self.path.glob('shard-*.safetensors'))):05d}.safetensors"
            partial = shard.with_suffix(".partial")
            save_file(tensors, str(partial))
            os.replace(partial, shard)
            self._shard_of.update(dict.fromkeys(tensors, shard))
        progress.close()
        return len(keys)

    @torch.no_grad()
    def _compute(self, target, sequences: list[list[int]]) -> list[torch.Tensor]:
        device = target.device
        width = max(len(ids) for ids in sequences)
        input_ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = torch.tensor(ids, device=device)
            attention_mask[i, : len(ids)] = 1
        with decoding_linear_form(device)():
            outputs = target.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        features = context_features(outputs.hidden_states, self.description["target_layer_ids"])
        if self.description.get("final_hidden_state"):
            features = torch.cat([features, outputs.last_hidden_state], dim=-1)
        features = features.to(STORAGE_DTYPE)
        return [features[i, : len(ids)].cpu().contiguous() for i, ids in enumerate(sequences)]


def _length_batches(keys: list[str], sequences: dict, tokens_per_batch: int) -> list[list[str]]:
    """`keys` in batches of similar length whose padded size stays within `tokens_per_batch`."""
    ordered = sorted(keys, key=lambda k: len(sequences[k]), reverse=True)
    batches, batch = [], []
    for key in ordered:
        # The longest row comes first, so the batch's padded width is its first row's length.
        if batch and (len(batch) + 1) * len(sequences[batch[0]]) > tokens_per_batch:
            batches.append(batch)
            batch = []
        batch.append(key)
    return batches + ([batch] if batch else [])
