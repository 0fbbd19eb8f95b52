"""Where a run's inputs come from: a local folder, an ``s3://`` prefix or a DICOMweb service, plus their truth.

Items: files with the model's extensions; for the MRI model also DICOM series, each a folder of
``.dcm`` files (one item, its key the folder with a trailing ``/``, handed to the engine as one
``multipart/related`` body). From DICOMweb (``http(s)://host/dicom-web``, QIDO-RS search, WADO-RS
retrieve): one item per instance (mammograms) or per series (MRI), keyed
``studies/<uid>/series/<uid>[/instances/<uid>]`` relative to the service root.

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
from medxplain_contract import dicomweb
from medxplain_contract.layout import join
from medxplain_contract.multipart import encode_related
from medxplain_contract.storage import Bucket, parse_s3_url
from medxplain_dicom.algorithm import MANUFACTURER  # of every derived object we write: never an input

EXTENSIONS = {"ddsm": (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"), "adni": (".nii", ".nii.gz")}
INDEX_FILES = {"ddsm": "images.csv", "adni": "subjects.csv"}
MAX_INPUT_BYTES = 512 * 1024 * 1024  # the engine's own decompressed limit; larger files are refused unread
SERIES_SUFFIX = ".dcm"  # the files of a DICOM series folder (MRI)
MODALITIES = {"ddsm": "MG", "adni": "MR"}  # the DICOMweb source's default modality filter


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

    sized = True  # the listing knows every input's size (DICOMweb's does not)

    def __init__(self, spec: str, config_getter=None) -> None:
        self.spec = spec
        self._listing: dict[str, int] | None = None
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
        """Relative key -> size of every file under the source (listed once, then remembered)."""
        if self._listing is None:
            self._listing = self._list()
        return self._listing

    def _list(self) -> dict[str, int]:
        if self.bucket is not None:
            base = self.prefix + "/" if self.prefix else ""
            return {k[len(base):]: size for k, size in self.bucket.list(base)}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size
                for p in sorted(self.root.rglob("*")) if p.is_file()}

    def read(self, key: str) -> bytes:
        """A file's bytes; for a series folder (``key`` ends in ``/``) its ``.dcm`` files as one
        ``multipart/related`` body, in name order (the engine sorts slices by position anyway)."""
        if key.endswith("/"):
            members = series_members(self.list(), key)
            if not members:
                raise FileNotFoundError("the series folder holds no .dcm files")
            return encode_related([self._read_file(k) for k in members])[0]
        return self._read_file(key)

    def _read_file(self, key: str) -> bytes:
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


def series_members(listing: dict[str, int | None], folder: str) -> list[str]:
    """The ``.dcm`` files directly inside ``folder`` (a key ending in ``/``), sorted."""
    return sorted(k for k in listing if k.startswith(folder) and "/" not in k[len(folder):]
                  and k.lower().endswith(SERIES_SUFFIX))


def series_folders(listing: dict[str, int | None]) -> dict[str, int]:
    """Every folder holding ``.dcm`` files (one MRI series each) -> their total size."""
    folders: dict[str, int] = {}
    for key, size in listing.items():
        if key.lower().endswith(SERIES_SUFFIX) and "/" in key:
            folder = key.rsplit("/", 1)[0] + "/"
            folders[folder] = folders.get(folder, 0) + (size or 0)
    return folders


class DicomwebSource:
    """Inputs from a DICOMweb service: QIDO-RS finds them, WADO-RS retrieves the stored files.

    Filters: ``study`` / ``series`` (UIDs) and ``modality`` (default: the model's, MG or MR; ``any``:
    none). Series of our own derived objects (Manufacturer ``medxplain_dicom.algorithm.MANUFACTURER``:
    results stored by an earlier ``--stow``) are never inputs. Non-image objects the filters select (an SR, an RT plan)
    stay items and fail as bad input, so nothing is silently dropped.
    """

    sized = False  # QIDO gives no sizes: each retrieve is capped at MAX_INPUT_BYTES instead

    def __init__(self, pacs: dicomweb.Pacs, kind: str, study: str | None = None, series: str | None = None,
                 modality: str | None = None) -> None:
        self.pacs, self.kind, self.study, self.series_uid = pacs, kind, study, series
        chosen = (modality or MODALITIES[kind]).strip()
        self.modality = None if chosen.lower() == "any" else chosen.upper()
        self.skipped_derived = 0  # series of our own results left out
        self._listing: dict[str, int | None] | None = None

    def list(self) -> dict[str, int | None]:
        if self._listing is None:
            self._listing = self._search()
        return self._listing

    def _search(self) -> dict[str, int | None]:
        found = self.pacs.series(self.study, self.series_uid, self.modality)
        keys: list[str] = []
        for row in found:
            if (row.get("Manufacturer") or "").strip() == MANUFACTURER:
                self.skipped_derived += 1
                continue
            study, series = row["StudyInstanceUID"], row["SeriesInstanceUID"]
            if not study or not series:
                continue
            if self.kind == "adni":
                keys.append(f"studies/{study}/series/{series}")
                continue
            keys += [f"studies/{study}/series/{series}/instances/{i['SOPInstanceUID']}"
                     for i in self.pacs.instances(study, series) if i.get("SOPInstanceUID")]
        return dict.fromkeys(sorted(keys))

    def read(self, key: str) -> bytes:
        """The instance's file (mammogram), or the series' files as one ``multipart/related`` body (MRI)."""
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "studies" and parts[2] == "series":
            files = self.pacs.retrieve(parts[1], parts[3], max_bytes=MAX_INPUT_BYTES)
            return encode_related(files)[0]
        if len(parts) == 6 and parts[0] == "studies" and parts[2] == "series" and parts[4] == "instances":
            files = self.pacs.retrieve(parts[1], parts[3], parts[5], max_bytes=MAX_INPUT_BYTES)
            if len(files) != 1:
                raise dicomweb.PacsError("retrieving an instance: the PACS sent more than one object")
            return files[0]
        raise SourceError("a DICOMweb item key must be studies/<uid>/series/<uid>[/instances/<uid>]")

    def read_optional(self, key: str) -> bytes | None:
        return None  # no masks in a PACS


def open_source(spec: str, config_getter=None, *, kind: str, pacs: dicomweb.Pacs | None = None,
                study: str | None = None, series: str | None = None,
                modality: str | None = None) -> Source | DicomwebSource:
    """The source ``spec`` names: a DICOMweb root URL (with ``pacs`` connected to it), s3:// or a folder."""
    if dicomweb.is_dicomweb_url(spec):
        if pacs is None:
            raise SourceError("a DICOMweb source needs DICOMweb settings")
        return DicomwebSource(pacs, kind, study, series, modality)
    if study or series or modality:
        raise SourceError("--study, --series and --modality filter a DICOMweb source (--input http(s)://...)")
    return Source(spec, config_getter)


def _candidates(listing: dict[str, int | None], kind: str, source) -> dict[str, int | None]:
    """Key -> size of the inputs a source without an index holds."""
    if isinstance(source, DicomwebSource):
        return listing
    found = {k: listing[k] for k in listing if k.lower().endswith(EXTENSIONS[kind])}
    if kind == "adni":
        found.update(series_folders(listing))
    return found


def _size_of(listing: dict[str, int | None], key: str, kind: str) -> int | None:
    """An index row's input size; None when it is not in the source (MRI rows may name series folders)."""
    if key in listing:
        return listing[key]
    if kind == "adni":
        folder = key.rstrip("/") + "/"
        members = series_members(listing, folder)
        if members:
            return sum(listing[m] or 0 for m in members)
    return None


def plan_items(source: Source | DicomwebSource, kind: str, class_names: list[str], labels_csv: Path | None,
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
        found = _candidates(listing, kind, source)
        keys = sorted(found)
        ids = assign_ids(keys, pseudonyms)
        return [SourceItem(ids[k], k, found[k]) for k in keys], "none"
    if split is not None:
        if "split" not in rows[0]:
            raise SourceError(f"--split {split}: the index has no 'split' column")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise SourceError(f"--split {split}: no index row has that split")
    keys = [_relative(r["path"], n) for n, r in enumerate(rows, start=2)]
    if kind == "adni":  # a row naming a series folder: the folder key with its trailing slash
        keys = [k.rstrip("/") + "/" if series_members(listing, k.rstrip("/") + "/") and k not in listing else k
                for k in keys]
    ids = assign_ids(keys, pseudonyms)
    items = []
    for key, n, row in sorted(zip(keys, range(2, len(rows) + 2), rows), key=lambda e: (e[0], e[1])):
        mask = row.get("mask_path") or None
        case = row.get("case_id") or row.get("subject_id") or None
        items.append(SourceItem(ids[key], key, _size_of(listing, key, kind), pseudonyms.case_id(case) if case else None,
                                _truth(row, class_names), _relative(mask, n) if mask else None))
    return items, origin


def _relative(path: str, row: int) -> str:
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:  # the path itself is not echoed: it may name a patient
        raise SourceError(f"index paths must be relative to the source and stay inside it (row {row})")
    return posix.as_posix() + ("/" if path.endswith("/") and posix.as_posix() != "." else "")


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
