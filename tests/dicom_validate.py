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
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DCMDUMP = shutil.which("dcmdump") or "/usr/bin/dcmdump"


def available() -> bool:
    return Path(DCIODVFY).is_file() and Path(DCMDUMP).is_file()


def require_dciodvfy() -> None:
    if not available():
        pytest.skip("dciodvfy or dcmdump (Debian packages dicom3tools, dcmtk) is not installed")


def findings(obj: Dataset | str | Path, timeout: float = 120.0) -> list[str]:
    """All Error and Warning lines dciodvfy prints for ``obj`` (a path, or a Dataset written to a temp file).

    dciodvfy cannot read the deflated transfer syntax (parametric maps are deflated): such an object is
    checked by dcmtk's ``dcmdump`` as written (it must parse without an error line) and given to dciodvfy
    re-encoded as explicit VR little endian, the same dataset byte for byte once inflated.
    """
    if isinstance(obj, Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
            path = Path(tmp) / "object.dcm"
            obj.save_as(path, enforce_file_format=True)
            return findings(path, timeout)
    meta = dcmread(obj, stop_before_pixels=True).file_meta
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        dump = subprocess.run([DCMDUMP, "-q", str(obj)], check=False, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
        problems = [f"Error - dcmdump: {line.strip()}" for line in (dump.stderr + dump.stdout).splitlines()
                    if line.startswith(("E:", "F:"))] + ([f"Error - dcmdump exit {dump.returncode}"]
                                                          if dump.returncode else [])
        native = dcmread(obj)
        native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
            path = Path(tmp) / "native.dcm"
            native.save_as(path, enforce_file_format=True)
            return problems + findings(path, timeout)
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
