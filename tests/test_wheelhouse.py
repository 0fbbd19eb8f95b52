"""docker/wheelhouse.sh, the images' requirements step: fills a wheelhouse once, then installs offline.

Two local PEP 503 indexes stand in for PyPI and the torch index (no network in tests): the default
index has ``fakeorch 2.0`` depending on ``fakenvidia`` (PyPI's CUDA torch), the torch index
``fakeorch 2.0+cpu`` without it. Real pip in a real virtualenv runs the script.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docker" / "wheelhouse.sh"


def make_wheel(index: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel (one module) in ``index/<name>/`` of a PEP 503 simple index."""
    folder = index / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            data = text.encode()
            zf.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        zf.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")
    # pip reads a file:// index through index.html pages (PEP 503), not directory listings
    links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in sorted(folder.glob("*.whl")))
    (folder / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtualenv with pip (the images' deps stage is one)."""
    root = tmp_path_factory.mktemp("wheelhouse-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    return root


def run_script(venv: Path, *args: str | Path, index: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv),
               PIP_INDEX_URL=index.as_uri(), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return subprocess.run(["sh", str(SCRIPT), *map(str, args)], check=False, env=env, capture_output=True, text=True, timeout=300)


def installed(venv: Path) -> dict[str, str]:
    out = subprocess.run([venv / "bin" / "python", "-m", "pip", "list", "--format", "freeze"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("==") for line in out.split() if line.startswith(("fake", "helper")))


def test_fills_once_then_installs_offline_with_the_torch_flavour(tmp_path, venv):
    pypi, torch_index, house = tmp_path / "pypi", tmp_path / "torch-index", tmp_path / "house"
    make_wheel(pypi, "fakeorch", "2.0", requires=("fakenvidia",))  # PyPI's CUDA build
    make_wheel(pypi, "fakenvidia", "1.0")
    make_wheel(pypi, "helperlib", "1.0")
    make_wheel(torch_index, "fakeorch", "2.0+cpu")
    (tmp_path / "torch.txt").write_text("fakeorch==2.0\n")
    (tmp_path / "req.txt").write_text("fakeorch==2.0\nhelperlib==1.0\n")

    first = run_script(venv, house, tmp_path / "req.txt", tmp_path / "torch.txt", torch_index.as_uri(), index=pypi)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "fetching only the missing ones" in first.stdout
    # torch came from its own index, and PyPI's CUDA build (with its dependency) was not fetched
    assert installed(venv) == {"fakeorch": "2.0+cpu", "helperlib": "1.0"}
    [folder] = house.iterdir()  # one folder per torch index
    assert folder.name.startswith("torch-") and len(folder.name) == len("torch-") + 12
    assert sorted(p.name for p in folder.iterdir()) == ["fakeorch-2.0+cpu-py3-none-any.whl",
                                                        "helperlib-1.0-py3-none-any.whl"]

    # A re-run (a fresh virtualenv, as after a changed requirements file) with both indexes gone
    subprocess.run([venv / "bin" / "python", "-m", "pip", "uninstall", "-y", "fakeorch", "helperlib"],
                   check=True, capture_output=True)
    shutil.rmtree(pypi)
    shutil.rmtree(torch_index)
    second = run_script(venv, house, tmp_path / "req.txt", tmp_path / "torch.txt", torch_index.as_uri(), index=pypi)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "nothing downloaded" in second.stdout
    assert installed(venv) == {"fakeorch": "2.0+cpu", "helperlib": "1.0"}


def test_a_requirement_no_index_has_fails_the_step(tmp_path, venv):
    pypi = tmp_path / "pypi"
    make_wheel(pypi, "helperlib", "1.0")
    (tmp_path / "req.txt").write_text("helperlib==9.9\n")
    proc = run_script(venv, tmp_path / "house", tmp_path / "req.txt", index=pypi)
    assert proc.returncode != 0
    assert "helperlib==9.9" in proc.stderr


def test_usage_error_without_arguments(venv, tmp_path):
    proc = run_script(venv, index=tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr
