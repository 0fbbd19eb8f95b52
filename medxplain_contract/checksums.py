"""Integrity on read: an object is used only if its bytes hash to the sha256 recorded when it was written.

Items are checked against their ``_complete.json`` (written by the writer that committed the item,
so an object overwritten later by another writer, a manual copy or bit rot is caught); model and
run-level objects against ``run.json``'s ``objects`` or the ``x-amz-meta-sha256`` of the write.
"""

from __future__ import annotations

import hashlib


class IntegrityError(RuntimeError):
    """An object's content does not match its recorded sha256; ``key`` says which object."""

    def __init__(self, key: str, reason: str = "sha256_mismatch", item_id: str | None = None) -> None:
        super().__init__(f"{key}: content does not match the sha256 recorded at write time ({reason})")
        self.key, self.reason, self.item_id = key, reason, item_id


def verified(key: str, data: bytes, expected: str | None, item_id: str | None = None) -> bytes:
    """``data`` if it hashes to ``expected``; IntegrityError otherwise (also when nothing was recorded)."""
    if expected is None:
        raise IntegrityError(key, "no recorded sha256", item_id)
    if hashlib.sha256(data).hexdigest() != expected:
        raise IntegrityError(key, "sha256_mismatch", item_id)
    return data
