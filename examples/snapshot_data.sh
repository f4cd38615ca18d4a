#!/usr/bin/env bash
# Copies the drafter data's shards, gzipped, and its run log into the repository, so that hours of generation outlive
# the cache directory (a new machine starts without one). The shard still being written goes too, up to its last
# complete line: a session's end would otherwise lose up to 4,095 rows. A copy is rewritten only when its shard holds
# other rows than the copy, and never when the copy holds rows the cache lacks (a cache that was not restored first).
# On a new machine, before resuming the generator:
#   .venv/bin/blockpilot data-merge results/current/drafter_data/rows --into ~/.cache/blockpilot_hf/data/smollm2-scale-v1
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot_hf}
DATA=${DATA:-$CACHE/data/smollm2-scale-v1}
ROWS=${ROWS:-results/current/drafter_data/rows}
mkdir -p "$ROWS"
"$PYTHON" - "$DATA" "$ROWS" <<'PY'
import gzip, json, sys
from pathlib import Path

from blockpilot_hf.training.data import job_key

data, rows = map(Path, sys.argv[1:])


def keys(lines: bytes) -> set:
    return {job_key(json.loads(line)) for line in lines.splitlines()}


# Complete lines only: the generator may be half-way through writing the open shard's last one.
shards = {shard.name: shard.read_bytes() for shard in sorted(data.glob("shard-*.jsonl"))}
shards = {name: text[: text.rfind(b"\n") + 1] for name, text in shards.items()}
held = set().union(*map(keys, shards.values()))
for name, text in shards.items():
    copy = rows / f"{name}.gz"
    before = gzip.decompress(copy.read_bytes()) if copy.is_file() else b""
    if before == text:
        continue
    missing = keys(before) - held
    if missing:
        sys.exit(
            f"{copy} holds {len(missing)} rows that {data} lacks; not overwritten. Restore them first: "
            f"blockpilot data-merge {rows} --into {data}"
        )
    partial = copy.with_name(copy.name + ".partial")
    partial.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
    partial.replace(copy)
    count = text.count(b"\n")
    print(f"{name}: {count} rows -> {copy} ({copy.stat().st_size / 2**20:.1f} MiB)")
PY
# The run log (exact commands, package versions, prompt-set hashes) goes along: data-merge merges it too.
[ ! -f "$DATA/runs.json" ] || cp "$DATA/runs.json" "$ROWS/runs.json"
