"""A run's result-defining options, fixed at its first write, so a re-run never mixes in other results.

Everything that changes an item's objects is in the fingerprint: the archive's content digest, the
engine's API version, the parsed request options (methods, top-k, encoding, ...), the split and
where the ground truth came from. Batch size, threads and shard count are not: they do not change
results. ``fingerprint.json`` is created with ``If-None-Match: *``; a later run whose fingerprint
differs is refused (exit 2) with one line naming what differs.
"""

from __future__ import annotations

import hashlib
import json

from medxplain_contract.layout import FINGERPRINT, RunLayout
from medxplain_contract.storage import Bucket, PreconditionFailed

__all__ = ["FINGERPRINT", "FingerprintMismatch", "check_or_record"]


class FingerprintMismatch(ValueError):
    """The output prefix holds a run made with other options (a usage error: exit 2)."""


def digest(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def check_or_record(out: Bucket, prefix: str, options: dict) -> str:
    """Record ``options`` as the run's fingerprint, or check them against the recorded one."""
    fingerprint = digest(options)
    key = RunLayout(prefix).fingerprint
    body = (json.dumps({"fingerprint": fingerprint, "options": options}, indent=1, sort_keys=True) + "\n").encode()
    try:
        out.put_if(key, body)
        return fingerprint
    except PreconditionFailed:
        recorded = json.loads(out.get(key))
    if recorded.get("fingerprint") == fingerprint:
        return fingerprint
    old = recorded.get("options") or {}
    differs = [f"{name} {_short(old.get(name))} -> {_short(options.get(name))}"
               for name in sorted(set(old) | set(options)) if old.get(name) != options.get(name)]
    raise FingerprintMismatch(f"s3://{out.name}/{prefix} was run with other options ({'; '.join(differs)}); "
                              "its items would be mixed: use a new --output prefix")
