"""The engine's identity in every response: package version plus a digest of the code actually loaded."""

from __future__ import annotations

import functools
import hashlib
from importlib import import_module
from pathlib import Path

ENGINE_VERSION = "0.1.0"
ENGINE_PACKAGES = ("medxplain_contract", "medxplain_models", "medxplain_engine")  # the runtime adapters are not engine code


@functools.cache
def engine_record() -> dict:
    """{"version", "code_sha256"}: sha256 over the sorted (path, sha256) of the engine packages' .py files."""
    lines = []
    for name in ENGINE_PACKAGES:
        root = Path(import_module(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                lines.append(f"{name}/{path.relative_to(root).as_posix()} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return {"version": ENGINE_VERSION, "code_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
