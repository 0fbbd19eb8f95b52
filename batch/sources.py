"""Where a run's inputs come from: a local folder or an ``s3://`` prefix, plus their ground truth.

Item ids are pseudonyms of the key relative to the input prefix (``batch.pseudonyms``: a keyed
digest, never the file name itself and never anything inside the file, such as DICOM patient tags);
an id depends on its own key only, so adding files never changes the ids of the others.
When the source root holds the synthetic sets' index (``images.csv`` / ``subjects.csv``) or
``--labels`` is given, that index defines the items (its ``path`` column) and their truth, so
mask and DICOM side folders are not mistaken for inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from batch.pseudonyms import Pseudonyms
from medxplain_contract.layout import join
from medxplain_contract.storage import Bucket, parse_s3_url

EXTENSIONS = {"ddsm": (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"), "adni": (".nii", ".nii.gz")}
INDEX_FILES = {"ddsm": "images.csv", "adni": "subjects.csv"}
MAX_INPUT_BYTES = 512 * 1024 * 1024  # the engine's own decompressed limit; larger files are refused unread


class SourceError(ValueError):
    """The source or its labels cannot be used (a usage error: exit 2)."""


@dataclass(frozen=True)
class SourceItem:
    item_id: str
    key: str  # relative to the source root, '/'-separated
    size: int | None
    case_id: str | None = None  # pseudonymised like the item id
    truth: int | None = None
    mask_key: str | None = None


def assign_ids(keys: list[str], pseudonyms: Pseudonyms) -> dict[str, str]:
    """key -> item id: each id is a function of its own key (and the run's id key) only."""
    ids = {k: pseudonyms.item_id(k) for k in keys}
    if len(set(ids.values())) != len(ids):  # 80-bit digests: practically never; refuse rather than mix
        raise SourceError("two input keys got the same item id; use a new --output prefix (new id key)")
    return ids


def shard_of(item_id: str, shards: int) -> int:
    """Stable partition: the same item lands in the same shard on every machine and run."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:12], 16) % shards


class Source:
    """Lists and reads input files; ``root`` is a local folder or a bucket prefix."""

    def __init__(self, spec: str, config_getter=None) -> None:
        self.spec = spec
        if spec.startswith("s3://"):
            bucket, self.prefix = parse_s3_url(spec)
            if config_getter is None:
                raise SourceError("an s3:// source needs storage settings")
            self.bucket: Bucket | None = Bucket(config_getter(), bucket)
            self.bucket.ensure(create=False)
            self.root = None
        else:
            self.bucket = None
            self.root = Path(spec)
            if not self.root.is_dir():
                raise SourceError(f"input folder not found: {spec}")

    def list(self) -> dict[str, int]:
        """Relative key -> size of every file under the source."""
        if self.bucket is not None:
            base = self.prefix + "/" if self.prefix else ""
            return {k[len(base):]: size for k, size in self.bucket.list(base)}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size
                for p in sorted(self.root.rglob("*")) if p.is_file()}

    def read(self, key: str) -> bytes:
        if self.bucket is not None:
            return self.bucket.get(join(self.prefix, key))
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise SourceError("an index path points outside the input folder")
        return path.read_bytes()

    def read_optional(self, key: str) -> bytes | None:
        try:
            return self.read(key)
        except (FileNotFoundError, SourceError):
            return None
        except Exception as err:
            if getattr(err, "code", None) in ("NoSuchKey", "NoSuchObject"):
                return None
            raise


def plan_items(source: Source, kind: str, class_names: list[str], labels_csv: Path | None,
               split: str | None = None, *, pseudonyms: Pseudonyms) -> tuple[list[SourceItem], str]:
    """All items of the source (every shard computes the same list) and where truth came from.

    ``split`` keeps only index rows whose ``split`` column has that value (e.g. the held-out test set).
    """
    listing = source.list()
    index_name = INDEX_FILES[kind]
    if labels_csv is not None:
        if not labels_csv.is_file():
            raise SourceError(f"labels file not found: {labels_csv}")
        rows, origin = _read_index(labels_csv.read_bytes(), str(labels_csv)), f"labels {labels_csv.name}"
    elif index_name in listing:
        rows, origin = _read_index(source.read(index_name), index_name), f"source index {index_name}"
    else:
        if split is not None:
            raise SourceError(f"--split needs an index with a 'split' column ({index_name} or --labels)")
        keys = sorted(k for k in listing if k.lower().endswith(EXTENSIONS[kind]))
        ids = assign_ids(keys, pseudonyms)
        return [SourceItem(ids[k], k, listing[k]) for k in keys], "none"
    if split is not None:
        if "split" not in rows[0]:
            raise SourceError(f"--split {split}: the index has no 'split' column")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise SourceError(f"--split {split}: no index row has that split")
    keys = [_relative(r["path"], n) for n, r in enumerate(rows, start=2)]
    ids = assign_ids(keys, pseudonyms)
    items = []
    for key, n, row in sorted(zip(keys, range(2, len(rows) + 2), rows), key=lambda e: (e[0], e[1])):
        mask = row.get("mask_path") or None
        case = row.get("case_id") or row.get("subject_id") or None
        items.append(SourceItem(ids[key], key, listing.get(key), pseudonyms.case_id(case) if case else None,
                                _truth(row, class_names), _relative(mask, n) if mask else None))
    return items, origin


def _relative(path: str, row: int) -> str:
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:  # the path itself is not echoed: it may name a patient
        raise SourceError(f"index paths must be relative to the source and stay inside it (row {row})")
    return posix.as_posix()


def _read_index(data: bytes, name: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    if not rows or "path" not in rows[0]:
        raise SourceError(f"{name}: needs a header with a 'path' column (and label or label_name)")
    return rows


def _truth(row: dict, class_names: list[str]) -> int | None:
    for column in ("label", "label_name"):
        value = (row.get(column) or "").strip()
        if not value:
            continue
        if value in class_names:
            return class_names.index(value)
        try:
            index = int(value)
        except ValueError:
            raise SourceError(f"label {value!r} is neither a class index nor one of {class_names}") from None
        if not 0 <= index < len(class_names):
            raise SourceError(f"label {index} out of range for classes {class_names}")
        return index
    return None
