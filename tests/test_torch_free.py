"""The UI, the client and the contract run where torch cannot be imported (the UI image has none).

Each check runs in a fresh interpreter whose ``sitecustomize`` (tests/torchless/) installs a
``sys.meta_path`` finder that refuses torch, torchvision and captum and logs who asked. A module that
needs torch then fails to import, and a project file that even tries is reported; third-party libraries
that merely probe for torch and carry on are allowed. The first test proves the blocker blocks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_ui_app import write_ui_runs

REPO = Path(__file__).resolve().parents[1]
TORCHLESS = REPO / "tests" / "torchless"
TORCH_FREE = ("ui", "medxplain_client", "medxplain_dicom", "medxplain_contract")


def run_torchless(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
                  timeout: float = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``python ARGS`` with torch blocked; returns the process and the blocked import attempts."""
    log = tmp_path / f"blocked-{len(list(tmp_path.glob('blocked-*')))}.jsonl"
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update(env or {})
    full_env.update({"PYTHONPATH": os.pathsep.join([str(TORCHLESS), str(REPO)]), "MEDXAI_BLOCKED_LOG": str(log)})
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    attempts = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, attempts


def from_project(attempts: list[dict]) -> list[dict]:
    """Blocked attempts made by a project file (not by a library probing for an optional dependency)."""
    return [a for a in attempts if Path(a["caller"]).resolve().is_relative_to(REPO)]


def report_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_really_blocks_torch(tmp_path):
    assert importlib.util.find_spec("torch") is not None  # torch is installed here: the blocker is what stops it
    proc, attempts = run_torchless(["-c", "import torch"], tmp_path)
    assert proc.returncode != 0 and "torch is blocked in this environment" in proc.stderr
    assert [a["module"] for a in attempts] == ["torch"]
    # a package that does need torch is reported as failing, with the project file that asked
    report = report_of(run_torchless([str(TORCHLESS / "import_all.py"), "medxplain_engine"], tmp_path)[0])
    assert "medxplain_engine.engine" in report["failed"] and report["torch_loaded"] == []
    _, attempts = run_torchless([str(TORCHLESS / "import_all.py"), "medxplain_models"], tmp_path)
    assert from_project(attempts), attempts


def test_ui_client_and_contract_import_without_torch(tmp_path):
    proc, attempts = run_torchless([str(TORCHLESS / "import_all.py"), *TORCH_FREE], tmp_path)
    report = report_of(proc)
    expected = [p for pkg in TORCH_FREE for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(report["imported"]) == len(expected) and len(expected) > 30
    assert report["failed"] == {}
    assert report["torch_loaded"] == []
    assert from_project(attempts) == [], f"project files that import torch: {from_project(attempts)}"


@pytest.fixture(scope="module")
def ui_runs(storage_users, model_store, ddsm_data, adni_data, tmp_path_factory) -> dict[str, str]:
    return write_ui_runs(storage_users, model_store, ddsm_data, adni_data, tmp_path_factory.mktemp("torchless-ui"))


def test_streamlit_app_renders_every_page_without_torch(ui_runs, torchserve, tmp_path):
    env = {k: v for k, v in ui_runs.items() if not k.startswith("_")}
    env.update({"MEDXAI_TORCHSERVE_URL": torchserve.inference_url, "MEDXAI_TORCHSERVE_KEY_FILE": str(torchserve.key_file),
                "HOME": str(tmp_path)})
    proc, attempts = run_torchless([str(TORCHLESS / "render_app.py"), "runs/ddsm"], tmp_path, env)
    report = report_of(proc)
    for page in ("cases", "units", "similar", "analyse"):
        assert report[page]["exceptions"] == [] and report[page]["errors"] == [], (page, report[page])
    assert report["cases"]["tables"] >= 1  # the run's items were listed from storage
    assert report["torch_loaded"] == []
    assert from_project(attempts) == [], f"project files that import torch: {from_project(attempts)}"
