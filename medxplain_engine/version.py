"""Which engine code drew a result: the package version and a digest of the engine's source files.

A ``.mar`` carries the engine code (``model_store/archive.py``) and its ``engine.json`` holds
:func:`engine_record` of the files it carries; the same digest computed over the code a process has
actually imported then proves that TorchServe or a batch job ran the archive's code, not whatever
happens to be installed. The digest is sha256 over ``sha256sum``-style lines (``<hex>  <path>\\n``) of
every ``.py`` file of :data:`ENGINE_PACKAGES`, sorted by relative path, ``__pycache__`` left out, so it
can be recomputed from an unpacked archive or a checkout with any sha256 tool.

Torch-free on purpose: the archiver and the batch job's check use it before any model loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

ENGINE_VERSION = "0.1.0"  # the project's version (pyproject.toml reads it from here)
# What produces a result; the runtime adapters (handlers/, batch/) are not engine code. The .mar also
# carries the TorchServe adapter (model_store/archive.py), identified by the archive digest.
ENGINE_PACKAGES = ("medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine")


class EngineCodeError(RuntimeError):
    """An engine package cannot be found where the code would be imported from."""


def package_files(name: str, folder: Path) -> dict[str, Path]:
    """``{"<package>/<relative path>": file}``: every file of a package folder (code and package data such as
    JSON schemas), without ``__pycache__`` and stray ``.pyc`` files."""
    return {f"{name}/{p.relative_to(folder).as_posix()}": p for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.relative_to(folder).parts and p.suffix != ".pyc"}


def is_engine_member(relative: str) -> bool:
    """Whether an archive member (``a/b.py``) is engine code counted by the digest."""
    parts = relative.split("/")
    return (len(parts) > 1 and parts[0] in ENGINE_PACKAGES and not relative.endswith("/")
            and "__pycache__" not in parts and not relative.endswith(".pyc"))


def code_files(root: Path) -> dict[str, Path]:
    """The engine files below ``root`` (a checkout or an unpacked archive), keyed by relative path."""
    files: dict[str, Path] = {}
    for name in ENGINE_PACKAGES:
        folder = Path(root) / name
        if not (folder / "__init__.py").is_file():
            raise EngineCodeError(f"{root} holds no package {name}")
        files.update(package_files(name, folder))
    return files


def loaded_code_files() -> dict[str, Path]:
    """The engine files this interpreter imports (or would import: the package is located, not executed)."""
    files: dict[str, Path] = {}
    for name in ENGINE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise EngineCodeError(f"package {name} is not importable here")
        files.update(package_files(name, Path(next(iter(spec.submodule_search_locations)))))
    return files


def contents_sha256(contents: Mapping[str, bytes]) -> str:
    """sha256 over ``<sha256 of file>  <relative path>`` lines sorted by path (``sha256sum`` format)."""
    lines = "".join(f"{hashlib.sha256(contents[rel]).hexdigest()}  {rel}\n" for rel in sorted(contents))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def code_sha256(files: Mapping[str, Path]) -> str:
    return contents_sha256({rel: path.read_bytes() for rel, path in files.items()})


def record_of(files: Mapping[str, Path]) -> dict:
    return {"version": ENGINE_VERSION, "code_sha256": code_sha256(files)}


@functools.cache
def _loaded_record() -> tuple[str, str]:
    record = record_of(loaded_code_files())
    return record["version"], record["code_sha256"]


def engine_record() -> dict:
    """``{"version", "code_sha256"}`` of the engine code this process runs (hashed once per process)."""
    version, digest = _loaded_record()
    return {"version": version, "code_sha256": digest}
