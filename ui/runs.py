"""Read-only access to batch runs in object storage, following docs/architecture.md's layout.

A run is the prefix that holds ``run.json``; the batch job writes that manifest last, so a prefix
without it is still running (or died) and is not offered. Everything under a finished run is
immutable, which is why the pages may cache what this module returns for as long as they like.
Every object is checked before use against the sha256 recorded when it was written: an item's
objects against its ``_complete.json``, run-level and model objects against ``run.json``'s
``objects``; a mismatch raises :class:`IntegrityError` naming the key. The run's ``private/``
objects (the id -> source key mapping) are never read here.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from medxplain_contract.storage import read_object
from ui.overlay import decode_map_bytes

MANIFEST = "run.json"


class StorageError(RuntimeError):
    """Object storage could not be read; the message is meant for people."""


class IntegrityError(StorageError):
    """An object's content differs from the sha256 recorded at write time; it is not shown."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} does not match the checksum recorded when it was written; not shown")
        self.key = key


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


def _s3_call(what: str, fn, *args, **kwargs):
    from minio.error import MinioException, S3Error
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except S3Error as err:
        if err.code in ("NoSuchKey", "NoSuchBucket"):
            raise KeyError(what) from None
        raise StorageError(f"storage refused {what}: {err.code} ({err.message})") from None
    except (MinioException, HTTPError, OSError) as err:
        raise StorageError(f"cannot reach object storage for {what}: {type(err).__name__}: {err}") from None


class RunStore:
    """Finds finished runs below one prefix (the prefix itself, or up to two levels deeper)."""

    def __init__(self, client, bucket: str, root: str, depth: int = 2) -> None:
        self.client, self.bucket, self.root, self.depth = client, bucket, root.strip("/"), depth

    def list_runs(self) -> list[RunInfo]:
        """Runs below the root; [] when the bucket does not exist. No HeadBucket call: the UI's storage
        policy lets it list only under runs/ and annotations/ (devstack/iam.py), and HeadBucket is a
        listing without a prefix."""
        try:
            return self._list_runs()
        except KeyError:  # NoSuchBucket
            return []

    def _list_runs(self) -> list[RunInfo]:
        found: list[RunInfo] = []
        level = [self.root]
        for _ in range(self.depth + 1):
            below: list[str] = []
            for prefix in level:
                manifest = self._manifest(prefix)
                if manifest is not None:
                    found.append(RunInfo(self.bucket, prefix, manifest))
                    continue  # a run's own folders (items/, units/, ...) are not runs
                below.extend(self._children(prefix))
            level = below
        return sorted(found, key=lambda r: str(r.manifest.get("ended") or r.prefix),
                      reverse=True)

    def open(self, prefix: str) -> Run:
        return Run(self.client, self.bucket, prefix)

    def _manifest(self, prefix: str) -> dict | None:
        try:
            return Run(self.client, self.bucket, prefix).json(MANIFEST)
        except KeyError:
            return None

    def _children(self, prefix: str) -> list[str]:
        start = f"{prefix}/" if prefix else ""
        objects = _s3_call(f"listing {start}", lambda: list(self.client.list_objects(self.bucket, prefix=start)))
        return [o.object_name.rstrip("/") for o in objects if o.is_dir]


class Run:
    """One finished run: typed getters over its objects (KeyError when an object is absent)."""

    def __init__(self, client, bucket: str, prefix: str) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self._markers: dict[str, dict] = {}
        self._manifest: dict | None = None
        self.integrity_problems: list[IntegrityError] = []  # items left out by results()

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def raw(self, relative: str) -> bytes:
        key = self.key(relative)
        return _s3_call(f"s3://{self.bucket}/{key}", read_object, self.client, self.bucket, key)

    def _expected(self, relative: str) -> str | None:
        """The recorded sha256 of an object, or None when nothing records it (bookkeeping, older runs)."""
        if relative.startswith("items/"):
            item_id, _, name = relative[len("items/"):].partition("/")
            if name == "_complete.json":
                return None
            if item_id not in self._markers:
                self._markers[item_id] = json.loads(self.raw(f"items/{item_id}/_complete.json"))
            expected = self._markers[item_id].get(name)
            if expected is None:
                raise IntegrityError(self.key(relative))  # not part of the committed item
            return expected
        if relative == MANIFEST or relative.startswith("private/"):
            return None
        return (self.manifest.get("objects") or {}).get(relative)

    def bytes(self, relative: str) -> bytes:
        if relative.startswith("private/"):
            raise KeyError(relative)  # the id -> source key mapping is not for the UI
        expected = self._expected(relative)
        data = self.raw(relative)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise IntegrityError(self.key(relative))
        return data

    def json(self, relative: str) -> dict:
        return json.loads(self.bytes(relative))

    def exists(self, relative: str) -> bool:
        try:
            _s3_call(relative, self.client.stat_object, self.bucket, self.key(relative))
            return True
        except KeyError:
            return False

    def list(self, relative_prefix: str, recursive: bool = True) -> list[str]:
        start = self.key(relative_prefix)
        cut = len(self.key(""))
        objects = _s3_call(f"listing {start}", lambda: list(
            self.client.list_objects(self.bucket, prefix=start, recursive=recursive)))
        return [o.object_name[cut:] for o in objects]

    # -- run level ------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads(self.raw(MANIFEST))
        return self._manifest

    def model_json(self) -> dict:
        try:
            return self.json("model/model.json")
        except KeyError:
            return {}

    def model_card(self) -> dict:
        try:
            return self.json("model/model_card.json")
        except KeyError:
            return {}

    def item_ids(self) -> list[str]:
        """Complete items only (their ``_complete.json`` exists), sorted."""
        return sorted(name[len("items/"):-len("/_complete.json")] for name in self.list("items/")
                      if name.endswith("/_complete.json"))

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

    def optional_json(self, relative: str) -> dict | list | None:
        try:
            return self.json(relative)
        except KeyError:
            return None

    def embeddings(self) -> tuple[list[str], np.ndarray] | None:
        try:
            ids = self.json("index/ids.json")
            matrix = np.load(io.BytesIO(self.bytes("index/embeddings.npy")), allow_pickle=False)
        except KeyError:
            return None
        if isinstance(ids, dict):
            ids = ids.get("ids", [])
        return list(ids), matrix.astype(np.float32)

    # -- item level -----------------------------------------------------------------------------

    def result(self, item_id: str) -> dict:
        return self.json(f"items/{item_id}/result.json")

    def input_name(self, item_id: str, result: dict | None = None) -> str:
        fmt = ((result or {}).get("input") or {}).get("format")
        if fmt == "nifti":
            return f"items/{item_id}/input.nii.gz"
        if fmt is not None:
            return f"items/{item_id}/input.png"
        return f"items/{item_id}/input.png" if self.exists(f"items/{item_id}/input.png") else \
            f"items/{item_id}/input.nii.gz"

    def input_bytes(self, item_id: str, result: dict | None = None) -> bytes:
        return self.bytes(self.input_name(item_id, result))

    def features(self, item_id: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.bytes(f"items/{item_id}/features.npz")), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def heatmap(self, item_id: str, method: str, result: dict) -> np.ndarray:
        """A heatmap as float32 with true values (2D: the analysed image's pixels; 3D: its grid)."""
        entry = (result.get("heatmaps") or {}).get(method) or {}
        encoding = entry.get("encoding") or "png"
        name = entry.get("key") or entry.get("file") or entry.get("object")
        if name:
            name = name if name.startswith("items/") else f"items/{item_id}/heatmaps/{name.rsplit('/', 1)[-1]}"
        else:
            name = f"items/{item_id}/heatmaps/{method}.{'nii.gz' if encoding == 'nifti.gz' else 'png'}"
        return decode_map_bytes(self.bytes(name), encoding, entry.get("scale"), entry.get("shape"))
