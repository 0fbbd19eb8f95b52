"""Load the same ``.mar`` TorchServe serves: unpack it safely and build the engine from it.

A ``.mar`` is a zip; member names are checked before anything is written (no absolute paths, no
``..``, no links), so a crafted archive cannot write outside the temporary folder (zip-slip).
Before that, its sha256 must match the published ``<name>.mar.sha256`` (and its HMAC signature when
``MEDXAI_ARCHIVE_KEY_FILE`` is set, see :mod:`medxplain_contract.integrity`): the archive's handler code
would otherwise run unchecked inside the job.

The archive carries the engine code TorchServe runs (``engine.json``: version and code digest, see
:mod:`medxplain_engine.version`). The job runs its own, installed engine (its runner imports the
engine's types, so one process holds one engine version) and refuses an archive whose engine.json
differs from the code it imports: a batch result is then drawn by exactly the archive's code, the same
as an online one, or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medxplain_contract.integrity import ArchiveIntegrityError, signing_key, verify_archive
from medxplain_engine.engine import Engine
from medxplain_engine.served import ServedSettingsError, served_settings
from medxplain_engine.version import EngineCodeError, engine_record

MAX_UNPACKED_BYTES = 8 * 1024 ** 3
HEX64 = re.compile(r"[0-9a-f]{64}")


class ArchiveError(ValueError):
    """The archive is missing, not a model archive, or unsafe (a usage error: exit 2)."""


@dataclass
class LoadedArchive:
    path: Path
    sha256: str  # of the .mar file itself
    engine: Engine
    directory: Path  # the unpacked archive (removed by close())
    engine_record: dict  # {"version", "code_sha256"}: the archive's engine.json, equal to the code this job runs
    handler_settings: dict = field(default_factory=dict)  # the archive's model-config.yaml ``handler:`` keys

    @property
    def archive_digest(self) -> str:
        return self.engine.archive_digest

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def safe_extract(mar: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(mar)
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"{mar} is not a readable model archive (.mar zip): {err}") from None
    with zf:
        total = 0
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename or ":" in info.filename:
                raise ArchiveError(f"{mar}: unsafe member name {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"{mar}: symbolic link member {info.filename!r}")
            total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise ArchiveError(f"{mar}: unpacks to {total} bytes, more than the {MAX_UNPACKED_BYTES} limit")
        root = dest.resolve()
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if not target.is_relative_to(root):
                raise ArchiveError(f"{mar}: member {info.filename!r} escapes the extraction folder")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def load_archive(mar: Path, expected_kind: str | None = None, device: str = "cpu", amp: bool = False,
                 eager: bool = False) -> LoadedArchive:
    """Verify, unpack and load an archive; the engine applies the archive's served speed-ups unless ``eager``."""
    mar = Path(mar)
    if not mar.is_file():
        raise ArchiveError(f"model archive not found: {mar}")
    try:
        sha256 = verify_archive(mar, signing_key())
    except ArchiveIntegrityError as err:
        raise ArchiveError(str(err)) from None
    directory = Path(tempfile.mkdtemp(prefix="medxai-mar-"))
    try:
        safe_extract(mar, directory)
        if not (directory / "model.json").is_file():
            raise ArchiveError(f"{mar} holds no model.json: not a MedXplain model archive")
        record = check_engine_code(mar, directory)
        try:
            engine = Engine.from_model_dir(directory, device, amp, settings={} if eager else None)
        except ServedSettingsError as err:
            raise ArchiveError(str(err)) from None
        if expected_kind and engine.kind != expected_kind:
            raise ArchiveError(f"{mar} is a {engine.kind!r} model, but --model {expected_kind} was given")
        return LoadedArchive(mar, sha256, engine, directory, record, served_settings(directory))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def check_engine_code(mar: Path, directory: Path) -> dict:
    """The archive's engine.json, which must equal the record of the engine code this process imports."""
    try:
        archived = json.loads((directory / "engine.json").read_text())
    except FileNotFoundError:
        raise ArchiveError(f"{mar} carries no engine.json (built before archives carried their engine code): "
                           "rebuild it with `python -m model_store archive`") from None
    except (OSError, ValueError) as err:
        raise ArchiveError(f"{mar}: unreadable engine.json: {err}") from None
    try:
        running = engine_record()
    except EngineCodeError as err:
        raise ArchiveError(f"cannot identify the engine code of this process: {err}") from None
    archived_sha = archived.get("code_sha256") if isinstance(archived, dict) else None
    if archived_sha != running["code_sha256"]:
        shown = archived_sha[:12] if isinstance(archived_sha, str) and HEX64.fullmatch(archived_sha) else "(none)"
        raise ArchiveError(
            f"{mar} carries engine code {shown}, but this process (batch job or KServe runtime) runs engine code {running['code_sha256'][:12]} "
            f"(version {running['version']}): run the code the archive was built with, or rebuild "
            "the archive with `python -m model_store archive`")
    return running
