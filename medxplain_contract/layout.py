"""The object keys of a batch run and of the annotation store: the one place that spells them.

A run lives below one prefix (docs/architecture.md, "run layout")::

    run.json                    the manifest, written last by the merge
    model/                      archive.json (the model record), model.json, model_card.json, ...
    items/<id>/<name>           result.json, features.npz, input.png|input.nii.gz, heatmaps/..., _complete.json
    failures/<id>.json          items that failed for good
    attempts/<id>.json          items a writer is processing (or that killed it)
    writers/<owner>.json        writer heartbeats; locks/merge.json the merge lock
    shards/00000-of-00002.json  shard summaries
    index/ units/ mri/ report.json analyses.json   run-level outputs of the merge
    index/ann.faiss             the approximate (FAISS) similarity index of runs above the size threshold
    private/                    the id -> source key mapping (never read by the UI)

``RunLayout("")`` gives keys relative to the run (what run.json and result.json record);
``RunLayout(prefix)`` the full object keys. Ids are pseudonyms, never patient identifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUN_MANIFEST = "run.json"
MODEL_RECORD = "model/archive.json"
COMPLETE = "_complete.json"
MERGE_LOCK = "locks/merge.json"
FINGERPRINT = "fingerprint.json"
PRIVATE_SOURCES = "private/sources.json"
ITEMS, FAILURES, ATTEMPTS, WRITERS, SHARDS = "items", "failures", "attempts", "writers", "shards"
MODEL, INDEX, UNITS, MRI, PRIVATE = "model", "index", "units", "mri", "private"
SIMILARITY, EMBEDDINGS, IDS = "similarity.json", "embeddings.npy", "ids.json"  # below index/
ANN_INDEX = "ann.faiss"  # below index/: only runs above the merge's ANN size threshold have it
_SHARD_NAME = re.compile(r"^shards/(\d{5})-of-(\d{5})\.json$")


def join(*parts: str) -> str:
    """S3 key from parts; empty parts and stray slashes are dropped (``join("", "a/")`` == ``"a"``)."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def parse_shard_key(relative: str) -> tuple[int, int] | None:
    """(index, count) of a shard summary's relative key, None for anything else."""
    match = _SHARD_NAME.match(relative)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class RunLayout:
    """Keys of one run below ``prefix`` (``""``: keys relative to the run)."""

    prefix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return join(self.prefix, *parts)

    def folder(self, name: str) -> str:
        """``<prefix>/<name>/`` for listings (trailing slash: ``items/`` must not match ``items2/``)."""
        return self.key(name) + "/"

    def relative(self, key: str) -> str:
        """A full key back to its run-relative form."""
        return key[len(self.prefix) + 1:] if self.prefix else key

    # -- run level
    @property
    def run_json(self) -> str:
        return self.key(RUN_MANIFEST)

    @property
    def model_record(self) -> str:
        return self.key(MODEL_RECORD)

    @property
    def fingerprint(self) -> str:
        return self.key(FINGERPRINT)

    @property
    def merge_lock(self) -> str:
        return self.key(MERGE_LOCK)

    @property
    def private_sources(self) -> str:
        return self.key(PRIVATE_SOURCES)

    @property
    def report(self) -> str:
        return self.key("report.json")

    def model(self, name: str) -> str:
        return self.key(MODEL, name)

    def index(self, name: str) -> str:
        return self.key(INDEX, name)

    def unit(self, unit: int) -> str:
        return self.key(UNITS, f"{int(unit):04d}.json")

    def units(self, name: str) -> str:
        return self.key(UNITS, name)

    def mri(self, name: str) -> str:
        return self.key(MRI, name)

    def shard(self, index: int, count: int) -> str:
        return self.key(SHARDS, f"{index:05d}-of-{count:05d}.json")

    def writer(self, owner: str) -> str:
        return self.key(WRITERS, f"{owner}.json")

    # -- item level
    def item(self, item_id: str, name: str) -> str:
        return self.key(ITEMS, item_id, name)

    def complete(self, item_id: str) -> str:
        return self.item(item_id, COMPLETE)

    def failure(self, item_id: str) -> str:
        return self.key(FAILURES, f"{item_id}.json")

    def attempt(self, item_id: str) -> str:
        return self.key(ATTEMPTS, f"{item_id}.json")

    def listed_id(self, folder: str, key: str, suffix: str) -> str | None:
        """The item id in ``<prefix>/<folder>/<id><suffix>``, None for any other key."""
        base = self.folder(folder)
        if not key.startswith(base) or not key.endswith(suffix):
            return None
        item_id = key[len(base):len(key) - len(suffix)]
        return item_id if item_id and "/" not in item_id else None


def annotation_unit_prefix(root: str, model: str, version: str, unit: int) -> str:
    """``<root>/<model>/<version key>/unit-0042/`` (segments already made safe by the caller)."""
    return join(root, model, version, f"unit-{int(unit):04d}") + "/"


def annotation_version_prefix(root: str, model: str, version: str) -> str:
    return join(root, model, version) + "/"


def annotation_key(unit_prefix: str, annotator: str, stamp: str) -> str:
    """One answer: ``<unit prefix><annotator id>/<stamp>.json`` (a new key per save)."""
    return f"{unit_prefix}{annotator}/{stamp}.json"


def annotation_parts(key: str) -> tuple[int, str]:
    """(unit, annotator id) of an annotation key."""
    parts = key.split("/")
    return int(parts[-3].removeprefix("unit-")), parts[-2]
