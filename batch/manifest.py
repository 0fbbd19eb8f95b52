"""Contents of a run's bookkeeping objects: shard summaries, the model record, run.json (keys: medxplain_contract.layout)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path

from medxplain_contract.layout import MODEL_RECORD, RUN_MANIFEST, SHARDS, RunLayout, parse_shard_key
from medxplain_contract.storage import Bucket

__all__ = ["MODEL_RECORD", "RUN_MANIFEST", "code_version", "complete_shard_sets", "listed_ids", "now",
           "parse_shard_key", "relative", "shard_key", "shard_keys"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def shard_key(index: int, count: int) -> str:
    """Run-relative key of a shard summary."""
    return RunLayout("").shard(index, count)


def shard_keys(out: Bucket, prefix: str) -> list[str]:
    """Run-relative keys of the shard summaries present."""
    layout = RunLayout(prefix)
    return [layout.relative(k) for k, _ in out.list(layout.folder(SHARDS))]


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
    return RunLayout(prefix).relative(key)


def listed_ids(out: Bucket, prefix: str, folder: str, suffix: str) -> set[str]:
    """Item ids under ``<prefix>/<folder>/`` whose key ends in ``suffix`` (complete markers, failure records)."""
    layout = RunLayout(prefix)
    ids = (layout.listed_id(folder, key, suffix) for key, _ in out.list(layout.folder(folder)))
    return {i for i in ids if i}
