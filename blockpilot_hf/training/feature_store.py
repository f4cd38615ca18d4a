"""The target's context features of the training rows, computed once and read back every epoch.

A drafter trains for several epochs on the same rows, with fresh anchors each time; the frozen target gives the same
features every time, so one target forward per row is enough. They are kept as safetensors shards, one bf16 tensor
`(length, len(target_layer_ids) * hidden_size)` per row, named by the row's key (a hash of its tokens). A store grows
with its data: rows added later are computed and appended, rows seen before are read back (memory-mapped).

bf16 halves the bytes of fp32 and is what drafters train in; a row of 768 tokens with two SmolLM2 layers takes 1.8 MB.

Rows come in two ways: `add` runs the target over rows that have none, and `put` stores features computed
elsewhere, e.g. by the decoder that generated the rows (`regenerate_responses(feature_store=...)`). Several
processes may write to one store at once (a data generator and a training run): each shard is named by its rows and
written whole, and a store looks for shards others wrote before it computes anything.
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
        self.hidden_size = target.config.get_text_config().hidden_size
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
        self._shard_of, self._open = {}, {}
        self._read_new_shards()

    def _read_new_shards(self) -> None:
        """Index the shards written since the store was opened (by this process or another)."""
        known = set(self._shard_of.values())
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            if shard not in known:
                with safe_open(str(shard), framework="pt") as f:
                    self._shard_of.update(dict.fromkeys(f.keys(), shard))

    @property
    def feature_size(self) -> int:
        """Width of a stored row: the context features (and the final hidden state, when kept)."""
        layers = len(self.description["target_layer_ids"]) + self.description.get("final_hidden_state", False)
        return layers * self.hidden_size

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        # Named by its rows, so that writers in other processes never pick the same name for other rows.
        name = hashlib.sha1("|".join(sorted(tensors)).encode()).hexdigest()[:16]
        shard = self.path / f"shard-{name}.safetensors"
        partial = shard.with_suffix(f".{os.getpid()}.partial")
        save_file(tensors, str(partial))
        os.replace(partial, shard)
        self._shard_of.update(dict.fromkeys(tensors, shard))

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
        self._read_new_shards()
        missing = {}
        for row in rows:
            ids = row["input_ids"][: self.max_length]
            key = row_key(ids)
            if key not in self._shard_of:
                missing[key] = ids
        if not missing:
            return 0
        needed = sum(len(ids) for ids in missing.values()) * self.feature_size * STORAGE_DTYPE.itemsize
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
            self._write_shard(tensors)
        progress.close()
        return len(keys)

    def put(self, rows: list[dict], features: list[torch.Tensor]) -> int:
        """Store features computed elsewhere, one `(len(row["input_ids"]), feature_size)` tensor per row (rows are
        truncated to `max_length` as in `add`), as one shard; rows already stored are skipped. Returns how many were
        stored."""
        tensors = {}
        for row, row_features in zip(rows, features, strict=True):
            ids = row["input_ids"][: self.max_length]
            if row_features.shape[-1] != self.feature_size or len(row_features) < len(ids):
                raise ValueError(
                    f"Features of shape {tuple(row_features.shape)} for a row of {len(ids)} tokens; the store "
                    f"{self.path} keeps ({len(ids)}, {self.feature_size}) per row (target layers "
                    f"{self.description['target_layer_ids']}): compute them with those layers."
                )
            key = row_key(ids)
            if key not in self._shard_of:
                tensors[key] = row_features[: len(ids)].to(STORAGE_DTYPE).contiguous()
        if tensors:
            self._write_shard(tensors)
        return len(tensors)

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
