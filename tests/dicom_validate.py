"""Run David Clunie's ``dciodvfy`` (Debian dicom3tools) on a DICOM file or dataset; return its findings.

dciodvfy checks an object against its IOD (modules, attribute types, defined terms) and prints
``Error - ...`` and ``Warning - ...`` lines on stderr. Tests assert ``errors(...) == []`` and may
list ``warnings(...)``. A test using these needs the binary: ``require_dciodvfy()`` skips cleanly
where dicom3tools is not installed (``make setup`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def available() -> bool:
    return Path(DCIODVFY).is_file()


def require_dciodvfy() -> None:
    if not available():
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")


def findings(obj: Dataset | str | Path, timeout: float = 120.0) -> list[str]:
    """All Error and Warning lines dciodvfy prints for ``obj`` (a path, or a Dataset written to a temp file)."""
    if isinstance(obj, Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
            path = Path(tmp) / "object.dcm"
            obj.save_as(path, enforce_file_format=True)
            return findings(path, timeout)
    run = subprocess.run([DCIODVFY, str(obj)], check=False,  # exit 1 = the object has errors: read, not raised
                         capture_output=True, text=True, errors="replace", timeout=timeout)
    lines = (run.stderr + run.stdout).splitlines()
    if not any(line.startswith(("Error", "Warning")) for line in lines) and run.returncode not in (0, 1):
        raise RuntimeError(f"dciodvfy failed on {obj} (exit {run.returncode})")
    if any(line.startswith("Abort") for line in lines):
        raise RuntimeError(f"dciodvfy could not read {obj}")
    return [line.strip() for line in lines if line.startswith(("Error", "Warning"))]


def errors(obj: Dataset | str | Path) -> list[str]:
    """dciodvfy's Error lines for ``obj``: an empty list means the object conforms to its IOD."""
    return [line for line in findings(obj) if line.startswith("Error")]


def warnings(obj: Dataset | str | Path) -> list[str]:
    return [line for line in findings(obj) if line.startswith("Warning")]
