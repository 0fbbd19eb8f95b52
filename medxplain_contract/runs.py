"""The one reader of batch runs in object storage (the merge and the UI both read through it).

A finished run is the prefix that holds ``run.json``; the merge writes that manifest last, so a
prefix without it is still running (or died). Every object is checked before use against the
sha256 recorded when it was written: an item's objects against its ``_complete.json`` (written by
the writer that committed the item, so an overwrite, a manual copy or bit rot is caught), run-level
and model objects against ``run.json``'s ``objects`` or, before the merge, the sha256 stored with
the write. A mismatch raises :class:`IntegrityError` naming the key. ``private/`` (the id -> source
key mapping) is never read here. Absent objects raise ``KeyError``.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image

from medxplain_contract.arrays import load_npy, load_npz
from medxplain_contract.checksums import IntegrityError, verified
from medxplain_contract.encodings import decode_3d, decode_map
from medxplain_contract.layout import ANN_INDEX, COMPLETE, FAILURES, ITEMS, PRIVATE, RunLayout
from medxplain_contract.similarity import SimilarityIndex
from medxplain_contract.storage import Bucket

_REL = RunLayout("")


@dataclass(frozen=True)
class RunInfo:
    bucket: str
    prefix: str
    manifest: dict

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def model_name(self) -> str:
        model = self.manifest.get("model") or {}
        return str(model.get("name") or model.get("kind") or self.manifest.get("model_name") or "?")

    @property
    def label(self) -> str:
        model = self.manifest.get("model") or {}
        when = self.manifest.get("ended") or self.manifest.get("started") or ""
        return f"{self.prefix or '/'} · {self.model_name} {model.get('version', '')} · {str(when)[:19]}".strip()


def find_runs(bucket: Bucket, root: str, depth: int = 2) -> list[RunInfo]:
    """Finished runs at ``root`` or up to ``depth`` levels below it, newest first; [] without the bucket.

    No HeadBucket call: the UI's storage policy lets it list only under runs/ and annotations/
    (devstack/iam.py), and HeadBucket is a listing without a prefix.
    """
    found: list[RunInfo] = []
    level = [root.strip("/")]
    try:
        for _ in range(depth + 1):
            below: list[str] = []
            for prefix in level:
                manifest = RunReader(bucket, prefix).optional_json(_REL.run_json)
                if manifest is not None:
                    found.append(RunInfo(bucket.name, prefix, manifest))
                    continue  # a run's own folders (items/, units/, ...) are not runs
                below.extend(bucket.children(prefix))
            level = below
    except KeyError:  # NoSuchBucket
        return []
    return sorted(found, key=lambda r: str(r.manifest.get("ended") or r.prefix), reverse=True)


def decode_mask(name: str, data: bytes) -> np.ndarray:
    """A stored ground-truth mask (mask.png or mask.nii.gz) as its integer array."""
    if name.endswith(".png"):
        return np.asarray(Image.open(io.BytesIO(data)))
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


class RunReader:
    """One run below ``prefix``: checked, typed getters over its objects (thread-safe reads)."""

    def __init__(self, bucket: Bucket, prefix: str) -> None:
        self.bucket = bucket
        self.layout = RunLayout(prefix)
        self.prefix = self.layout.prefix
        self._markers: dict[str, dict] = {}
        self._manifest: dict | None = None
        self.integrity_problems: list[IntegrityError] = []  # items left out by results()

    def key(self, relative: str) -> str:
        return self.layout.key(relative)

    # -- raw access -----------------------------------------------------------------------------

    def raw(self, relative: str) -> bytes:
        """Unchecked bytes (KeyError when absent): bookkeeping objects only."""
        return self.bucket.read(self.key(relative))

    def marker(self, item_id: str) -> dict:
        """The item's ``_complete.json``: object name -> sha256 (KeyError: the item is not complete)."""
        if item_id not in self._markers:
            self._markers[item_id] = json.loads(self.raw(_REL.complete(item_id)))
        return self._markers[item_id]

    def forget(self, item_id: str) -> None:
        """Drop the item's cached marker (the streaming merge reads each item once)."""
        self._markers.pop(item_id, None)

    def item_bytes(self, item_id: str, name: str) -> bytes:
        """An item object, verified against the item's marker."""
        key = self.key(_REL.item(item_id, name))
        marker = self.marker(item_id)
        if name not in marker:
            raise IntegrityError(key, "not part of the committed item", item_id)
        return verified(key, self.bucket.read(key), marker[name], item_id)

    def bytes(self, relative: str) -> bytes:
        """Any run object, checked as the module docstring says."""
        first = relative.split("/", 1)[0]
        if first == PRIVATE:
            raise KeyError(relative)  # the id -> source key mapping is not for readers of results
        if first == ITEMS:
            item_id, _, name = relative[len(ITEMS) + 1:].partition("/")
            return self.raw(relative) if name == COMPLETE else self.item_bytes(item_id, name)
        if relative == _REL.run_json:
            return self.raw(relative)
        expected = (self.manifest_or_none() or {}).get("objects", {}).get(relative)
        if expected is not None:
            return verified(self.key(relative), self.raw(relative), expected)
        if self.manifest_or_none() is None:  # before the merge: the sha256 stored with the write
            if not self.bucket.exists(self.key(relative)):
                raise KeyError(relative)
            return self.bucket.get_checked(self.key(relative))
        return self.raw(relative)  # not recorded in run.json (bookkeeping of older runs)

    def json(self, relative: str) -> dict:
        return json.loads(self.bytes(relative))

    def bookkeeping(self, relative: str) -> dict | None:
        """A bookkeeping object (shard summary, model record, failure, run.json) unchecked; None when absent."""
        try:
            return json.loads(self.raw(relative))
        except KeyError:
            return None

    def optional_json(self, relative: str) -> dict | list | None:
        try:
            return self.json(relative)
        except KeyError:
            return None

    def exists(self, relative: str) -> bool:
        return self.bucket.exists(self.key(relative))

    def list(self, relative_prefix: str) -> list[str]:
        """Run-relative keys of every object under ``relative_prefix`` (recursive, key order)."""
        return [self.layout.relative(k) for k, _ in self.bucket.list(self.key(relative_prefix))]

    def listed_ids(self, folder: str, suffix: str) -> list[str]:
        """Item ids under ``<folder>/`` whose key ends in ``suffix`` (complete markers, failure records)."""
        ids = (self.layout.listed_id(folder, k, suffix) for k, _ in self.bucket.list(self.layout.folder(folder)))
        return sorted({i for i in ids if i})

    # -- run level ------------------------------------------------------------------------------

    def manifest_or_none(self) -> dict | None:
        if self._manifest is None:
            try:
                self._manifest = json.loads(self.raw(_REL.run_json))
            except KeyError:
                return None
        return self._manifest

    @property
    def manifest(self) -> dict:
        manifest = self.manifest_or_none()
        if manifest is None:
            raise KeyError(self.key(_REL.run_json))
        return manifest

    def model_json(self) -> dict:
        return self.optional_json(_REL.model("model.json")) or {}

    def model_card(self) -> dict:
        return self.optional_json(_REL.model("model_card.json")) or {}

    def classifier(self) -> tuple[np.ndarray, np.ndarray] | None:
        """ddsm runs: the fc layer's (weight, bias) from model/classifier.npz."""
        try:
            raw = self.bytes(_REL.model("classifier.npz"))
        except KeyError:
            return None
        arrays = load_npz(raw)
        return arrays["weight"], arrays["bias"]

    def item_ids(self) -> list[str]:
        """Complete items only (their ``_complete.json`` exists), sorted."""
        return self.listed_ids(ITEMS, "/" + COMPLETE)

    def failure_ids(self) -> list[str]:
        return self.listed_ids(FAILURES, ".json")

    def embeddings(self) -> tuple[list[str], np.ndarray] | None:
        try:
            ids = self.json(_REL.index("ids.json"))
            matrix = load_npy(self.bytes(_REL.index("embeddings.npy")))
        except KeyError:
            return None
        if isinstance(ids, dict):
            ids = ids.get("ids", [])
        return list(ids), matrix.astype(np.float32)

    def similarity(self) -> SimilarityIndex | None:
        """The run's similarity index (None when the run has none); with the matrix when it is stored."""
        try:
            sim = self.bytes(_REL.index("similarity.json"))
        except KeyError:
            return None
        if b'"search":"ann"' in sim[:200]:  # large run: the ANN index (checked twice) instead of the matrix
            return SimilarityIndex.from_objects(sim, ann_index=self.bytes(_REL.index(ANN_INDEX)))
        try:
            emb, ids = self.bytes(_REL.index("embeddings.npy")), self.bytes(_REL.index("ids.json"))
        except KeyError:
            emb = ids = None
        return SimilarityIndex.from_objects(sim, emb, ids)

    # -- item level -----------------------------------------------------------------------------

    def result(self, item_id: str) -> dict:
        return json.loads(self.item_bytes(item_id, "result.json"))

    def results(self, item_ids: Iterable[str], workers: int = 8) -> dict[str, dict]:
        """Results of the items that pass their check; the others land in ``integrity_problems``."""
        ids = list(item_ids)

        def checked(item_id: str) -> dict | IntegrityError:
            try:
                return self.result(item_id)
            except IntegrityError as err:
                return err

        with ThreadPoolExecutor(max_workers=workers) as pool:
            read = dict(zip(ids, pool.map(checked, ids)))
        self.integrity_problems = [r for r in read.values() if isinstance(r, IntegrityError)]
        return {i: r for i, r in read.items() if not isinstance(r, IntegrityError)}

    def check_committed(self, item_id: str, skip: Iterable[str] = ()) -> None:
        """Every object the marker lists exists with the sha256 stored with its write (one HEAD each)."""
        skipped = set(skip)
        for name, expected in sorted(self.marker(item_id).items()):
            if name in skipped:
                continue
            key = self.key(_REL.item(item_id, name))
            stat = self.bucket.stat(key)
            if stat is None or stat[1] != expected:
                raise IntegrityError(key, "missing" if stat is None else "sha256_mismatch", item_id)

    def features(self, item_id: str) -> dict[str, np.ndarray]:
        return load_npz(self.item_bytes(item_id, "features.npz"))

    def input_name(self, item_id: str, result: dict | None = None) -> str:
        """Relative key of the analysed input: input.png (2D) or input.nii.gz (3D, on the model grid)."""
        result = result if result is not None else self.result(item_id)
        name = "input.nii.gz" if (result.get("input") or {}).get("format") == "nifti" else "input.png"
        return _REL.item(item_id, name)

    def input_bytes(self, item_id: str, result: dict | None = None) -> bytes:
        return self.bytes(self.input_name(item_id, result))

    def _map_entry(self, item_id: str, group: str, name: str, result: dict | None) -> tuple[dict, bytes]:
        result = result if result is not None else self.result(item_id)
        entry = (result.get(group) or {}).get(name)
        if not entry or "object" not in entry:
            raise KeyError(f"{group}/{name} of item {item_id}")
        return entry, self.item_bytes(item_id, entry["object"])

    def heatmap(self, item_id: str, method: str, result: dict | None = None) -> np.ndarray:
        """A heatmap's true values (2D: the sent image's frame; 3D: the sent grid)."""
        return decode_map(*self._map_entry(item_id, "heatmaps", method, result))

    def heatmap_image(self, item_id: str, method: str, result: dict | None = None) -> nib.Nifti1Image:
        """A 3D heatmap as its NIfTI image: the affine says where it lies."""
        return decode_3d(*self._map_entry(item_id, "heatmaps", method, result))

    def unit_map(self, item_id: str, unit: int | str, result: dict | None = None) -> np.ndarray:
        return decode_map(*self._map_entry(item_id, "unit_maps", str(unit), result))

    def mask(self, item_id: str, result: dict | None = None) -> np.ndarray | None:
        """The item's ground-truth mask on the heatmap's grid, None when the item has none."""
        result = result if result is not None else self.result(item_id)
        name = (result.get("item") or {}).get("mask")
        return None if not name else decode_mask(name, self.item_bytes(item_id, name))
