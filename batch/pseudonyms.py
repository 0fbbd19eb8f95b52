"""Pseudonymous item and case ids, so no source file name reaches an object key, a log line or the UI.

File names often carry identifiers (``MRN123_DOE_JANE.dcm``). An item id is the HMAC-SHA256 of
the source key under the run's id key, cut to 20 hex digits (80 bits): it depends on that one key
only, so adding files never changes another item's id, every shard computes the same id, and
without the id key nobody can recompute an id from a guessed name (a plain hash of an MRN-shaped
name could be reversed by trying every MRN). Case ids from an index get the same treatment.

The id key and the id -> source key mapping live in ONE object, ``private/sources.json`` under the
run, which only the batch job's credentials may read (the UI's policy denies ``*/private/*``; the
UI never reads it). ``--id-key-file`` supplies an organisation-wide key instead (same ids across
runs of the same data); the object then records only the key's sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field

from medxplain_contract.layout import ITEMS, RunLayout
from medxplain_contract.storage import Bucket, PreconditionFailed

ITEM_HEX = 20
CASE_HEX = 12
MIN_KEY_BYTES = 16


class PseudonymError(ValueError):
    """The id key of a run cannot be used (a usage error: exit 2)."""


@dataclass
class Pseudonyms:
    key: bytes = field(repr=False)
    cases: dict[str, str] = field(default_factory=dict, repr=False)  # pseudonym -> case id, as handed out

    def item_id(self, source_key: str) -> str:
        return "i" + hmac.new(self.key, b"item\0" + source_key.encode(), hashlib.sha256).hexdigest()[:ITEM_HEX]

    def case_id(self, case: str) -> str:
        pseudonym = "c" + hmac.new(self.key, b"case\0" + case.encode(), hashlib.sha256).hexdigest()[:CASE_HEX]
        self.cases[pseudonym] = case
        return pseudonym


def _key_digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def open_pseudonyms(out: Bucket, prefix: str, external_key: bytes | None = None) -> Pseudonyms:
    """The run's id key: created once (``If-None-Match: *``, the first shard wins), then reused."""
    if external_key is not None and len(external_key) < MIN_KEY_BYTES:
        raise PseudonymError(f"--id-key-file: the key must hold at least {MIN_KEY_BYTES} bytes")
    key = RunLayout(prefix).private_sources
    current = out.get_versioned(key)
    if current is None and out.any_under(RunLayout(prefix).folder(ITEMS)):
        raise PseudonymError(f"s3://{out.name}/{prefix} holds items made before pseudonymous ids; new ids would "
                             "be mixed with them: use a new --output prefix")
    if current is None:
        secret = external_key or secrets.token_bytes(32)
        record = {"format": 1, "key": None if external_key else secret.hex(), "key_sha256": _key_digest(secret),
                  "items": {}, "cases": {}}
        try:
            out.put_if(key, _record_bytes(record))
            return Pseudonyms(secret)
        except PreconditionFailed:  # another shard created it first: use that one
            current = out.get_versioned(key)
            if current is None:
                raise PseudonymError("the run's private/sources.json vanished while it was being read") from None
    record = json.loads(current.data)
    if external_key is not None:
        if _key_digest(external_key) != record.get("key_sha256"):
            raise PseudonymError("--id-key-file is not the id key this run was started with; ids would not "
                                 "match: use the same key or a new --output prefix")
        return Pseudonyms(external_key)
    if not record.get("key"):
        raise PseudonymError("this run's ids were made with an external key: pass the same --id-key-file")
    return Pseudonyms(bytes.fromhex(record["key"]))


def record_sources(out: Bucket, prefix: str, items: dict[str, str], cases: dict[str, str], attempts: int = 20) -> None:
    """Add id -> source key (and case pseudonym -> case id) entries; read-modify-write with ``If-Match``."""
    key = RunLayout(prefix).private_sources
    for _ in range(attempts):
        current = out.get_versioned(key)
        if current is None:
            raise PseudonymError("the run's private/sources.json is missing")
        record = json.loads(current.data)
        if items.items() <= record["items"].items() and cases.items() <= record["cases"].items():
            return  # nothing new (a re-run): no write
        record["items"] = record["items"] | items
        record["cases"] = record["cases"] | cases
        try:
            out.put_if(key, _record_bytes(record), if_match=current.etag)
            return
        except PreconditionFailed:  # another shard added its entries meanwhile: read again
            continue
    raise PseudonymError("could not update private/sources.json: too many concurrent writers")
