"""Names and contents of a run's bookkeeping objects: shard summaries, the model record, run.json."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path

from batch.store import Bucket, join

RUN_MANIFEST = "run.json"
MODEL_RECORD = "model/archive.json"
SHARDS_PREFIX = "shards/"
ITEMS_PREFIX = "items/"
FAILURES_PREFIX = "failures/"
_SHARD_NAME = re.compile(r"^shards/(\d{5})-of-(\d{5})\.json$")
REPO_ROOT = Path(__file__).resolve().parents[1]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def shard_key(index: int, count: int) -> str:
    return f"{SHARDS_PREFIX}{index:05d}-of-{count:05d}.json"


def parse_shard_key(key: str) -> tuple[int, int] | None:
    match = _SHARD_NAME.match(key)
    return (int(match.group(1)), int(match.group(2))) if match else None


@cache
def code_version() -> str:
    """``git describe`` of the checkout when there is one (dev, CI), else the installed package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], check=False, cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "medxplain " + metadata.version("medxplain")
    except metadata.PackageNotFoundError:
        return "unknown"


def complete_shard_sets(keys: list[str]) -> list[int]:
    """Shard counts N for which all N summaries exist (a run may have been re-sharded)."""
    seen: dict[int, set[int]] = {}
    for key in keys:
        parsed = parse_shard_key(key)
        if parsed:
            seen.setdefault(parsed[1], set()).add(parsed[0])
    return sorted(n for n, have in seen.items() if have >= set(range(n)))


def relative(prefix: str, key: str) -> str:
    return key[len(prefix) + 1:] if prefix else key


def listed_ids(out: Bucket, prefix: str, folder: str, suffix: str) -> set[str]:
    """Item ids under ``<prefix>/<folder>/`` whose key ends in ``suffix`` (complete markers, failure records)."""
    base = join(prefix, folder) + "/"
    ids = set()
    for key, _ in out.list(base):
        if key.endswith(suffix):
            item_id = key[len(base):len(key) - len(suffix)]
            if item_id and "/" not in item_id:
                ids.add(item_id)
    return ids
