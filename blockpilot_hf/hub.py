"""Publishing drafters and policies to the Hub with their own model cards.

`PreTrainedModel.push_to_hub` writes a generic README.md over ours, so publishing uploads the saved folder as it is
(config.json, safetensors) plus the card from `model_cards/<folder name>.md` (or the folder's own README.md) as
README.md, in one commit. `dry_run=True` returns exactly what would be uploaded and touches no network.
"""

import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

MODEL_CARDS = Path(__file__).resolve().parent.parent / "model_cards"
ARTIFACT_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "training_report.json",
    "generation_config.json",
)


def card_for(folder: Path) -> ModelCard:
    """The card of a saved drafter/policy: its own README.md, else `model_cards/<folder name>.md`."""
    own = folder / "README.md"
    if own.is_file():
        return ModelCard.load(own)
    shipped = MODEL_CARDS / f"{folder.name}.md"
    if shipped.is_file():
        return ModelCard.load(shipped)
    raise FileNotFoundError(
        f"No model card for {folder}: write {own} or {shipped} (YAML metadata with library_name, base_model, tags, "
        "then what it is, how it was trained and what was measured)."
    )


def upload_operations(folder: str | os.PathLike) -> list[CommitOperationAdd]:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the drafter/policy with `save_pretrained` first.")
    card = card_for(folder)
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())]
    for path in sorted(folder.iterdir()):
        if path.name in ARTIFACT_FILES or path.name.startswith("model-") and path.suffix == ".safetensors":
            operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)))
        elif path.suffix == ".png":
            operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)))
    return operations


def publish(folder, repo_id: str, token: str | None = None, private: bool = False, dry_run: bool = False):
    """Push `folder` to `repo_id` with its card. Returns the list of uploaded paths (or would-be paths)."""
    operations = upload_operations(folder)
    paths = [op.path_in_repo for op in operations]
    if dry_run:
        for op in operations:
            print(f"would upload {op.path_in_repo} ({op.upload_info.size} bytes)")
        return paths
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.create_commit(repo_id, operations=operations, commit_message=f"Upload {Path(folder).name} with blockpilot_hf")
    print(f"published {len(paths)} files to https://huggingface.co/{repo_id}")
    return paths
