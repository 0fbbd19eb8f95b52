"""The archives load into a real TorchServe (token auth on) and answer predictions."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil
import requests

from medxplain_engine.version import (
    ENGINE_PACKAGES,
    ENGINE_VERSION,
    code_files,
    contents_sha256,
    engine_record,
    record_of,
)
from medxplain_models.bundle import mar_digest
from tests.schema_check import checked

REPO = Path(__file__).resolve().parents[1]


def _first_test_row(data_dir, index_file: str) -> dict:
    with open(data_dir / index_file, newline="") as f:
        return next(r for r in csv.DictReader(f) if r["split"] == "test")


def test_archives_carry_everything_the_handler_needs(model_store):
    with zipfile.ZipFile(model_store / "adni.mar") as zf:
        names = set(zf.namelist())
    assert {"weights.pt", "model.json", "model_card.json", "unit_labels.json", "mean.nii.gz", "std.nii.gz",
            "brain_mask.nii.gz", "atlas.nii.gz", "atlas_labels.csv", "adni_handler.py",
            "MAR-INF/MANIFEST.json"} <= names
    with zipfile.ZipFile(model_store / "ddsm.mar") as zf:
        card = json.loads(zf.read("model_card.json"))
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
    assert len(card["weights_sha256"]) == 64 and card["metrics"]["macro_roc_auc"] is not None
    assert manifest["model"]["handler"] == "ddsm_handler.py"
    sidecar = json.loads((model_store / "ddsm.mar.json").read_text())
    assert sidecar["archive_digest"] == mar_digest(model_store / "ddsm.mar")


def _predict_first_test_item(torchserve, model_store, name: str, data_dir, index_file: str) -> dict:
    """POST the split's first test input; the body is schema-checked and names the archive's engine code."""
    row = _first_test_row(data_dir, index_file)
    r = requests.post(f"{torchserve.inference_url}/predictions/{name}", data=(data_dir / row["path"]).read_bytes(),
                      headers=torchserve.auth_header(), timeout=300)
    assert r.status_code == 200, r.text
    body = checked(r, "response")
    assert body["model"]["name"] == name
    assert body["model"]["archive_digest"] == mar_digest(model_store / f"{name}.mar")
    assert body["model"]["engine"] == _engine_json(model_store / f"{name}.mar")  # the archive's code drew it
    return body


def test_ddsm_prediction_over_rest(torchserve, ddsm_data, model_store):
    body = _predict_first_test_item(torchserve, model_store, "ddsm", ddsm_data, "images.csv")
    probs = body["prediction"]["probabilities"]
    assert set(probs) == {"normal", "benign", "malignant"}
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert body["input"]["mode"] == "full_image"


def test_adni_prediction_over_rest(torchserve, adni_data, model_store):
    body = _predict_first_test_item(torchserve, model_store, "adni", adni_data, "subjects.csv")
    assert set(body["prediction"]["probabilities"]) == {"CN", "AD"}
    assert body["input"]["resampled"] is False and body["warnings"] == []


def test_requests_without_or_with_a_wrong_token_are_refused(torchserve, ddsm_data):
    url = f"{torchserve.inference_url}/predictions/ddsm"
    payload = (ddsm_data / _first_test_row(ddsm_data, "images.csv")["path"]).read_bytes()
    assert requests.post(url, data=payload, timeout=30).status_code in (400, 401)
    wrong = {"Authorization": "Bearer not-the-key"}
    assert requests.post(url, data=payload, headers=wrong, timeout=30).status_code in (400, 401)


def test_bad_input_is_a_4xx_and_the_worker_survives(torchserve, ddsm_data):
    url = f"{torchserve.inference_url}/predictions/ddsm"
    r = requests.post(url, data=b"\x89PNG\r\n\x1a\ntruncated", headers=torchserve.auth_header(), timeout=60)
    assert 400 <= r.status_code < 500
    assert "message" in checked(r, "error")
    good = (ddsm_data / _first_test_row(ddsm_data, "images.csv")["path"]).read_bytes()
    ok = requests.post(url, data=good, headers=torchserve.auth_header(), timeout=120)
    assert ok.status_code == 200
    checked(ok, "response")


def test_management_api_cannot_register_models(torchserve):
    r = requests.post(f"{torchserve.management_url}/models", params={"url": "https://example.invalid/x.mar"},
                      headers=torchserve.auth_header("management"), timeout=30)
    assert r.status_code >= 400


def test_describe_call_lists_the_methods_and_the_cards_quality(torchserve):
    """TorchServe's customized describe reaches the engine: methods, defaults, and quality only if the card has it."""
    r = requests.get(f"{torchserve.management_url}/models/ddsm", params={"customized": "true"},
                     headers=torchserve.auth_header("management"), timeout=60)
    assert r.status_code == 200, r.text[:300]
    (entry,) = r.json()
    meta = entry["customizedMetadata"]
    meta = checked(meta, "describe")
    assert meta["api_version"] == "1" and meta["model"]["name"] == "ddsm"
    assert {"cam", "gradcam", "saliency", "guided_backprop", "integrated_gradients", "occlusion"} == set(meta["methods"])
    assert all(m["description"] for m in meta["methods"].values())
    # the test archive was never evaluated with --card: no quality is claimed
    assert not any("quality" in m for m in meta["methods"].values()) and meta["quality_source"] == {}


def _engine_json(mar) -> dict:
    with zipfile.ZipFile(mar) as zf:
        return json.loads(zf.read("engine.json"))


def test_archives_carry_their_engine_code(model_store):
    """Each .mar holds the engine packages and an engine.json that is the digest of exactly those files."""
    for name in ("ddsm", "adni"):
        with zipfile.ZipFile(model_store / f"{name}.mar") as zf:
            names = set(zf.namelist())
            carried = {n: zf.read(n) for n in names if n.split("/")[0] in ENGINE_PACKAGES and not n.endswith("/")}
        assert {"medxplain_engine/engine.py", "medxplain_contract/encodings.py", "medxplain_models/bundle.py"} <= set(carried)
        assert {"handlers/torchserve_adapter.py", "handlers/__init__.py", f"{name}_handler.py"} <= names  # the adapter
        assert "handlers/ddsm_handler.py" not in names  # the entry module is the archive's handler, at its root
        record = _engine_json(model_store / f"{name}.mar")
        assert record == {"version": ENGINE_VERSION, "code_sha256": contents_sha256(carried)}
        assert record == record_of(code_files(REPO))  # built from this checkout
        assert json.loads((model_store / f"{name}.mar.json").read_text())["engine"] == record


def test_torchserve_runs_the_archives_engine_code_without_the_repository(torchserve, model_store, tmp_path):
    """The worker imports the engine from the unpacked .mar: the project is neither installed nor on its path,
    and the engine record it reports is the archive's engine.json."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import medxplain_engine"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode != 0 and "No module named 'medxplain_engine'" in probe.stderr  # not installed
    workers = [p for p in psutil.Process(torchserve.pid).children(recursive=True)
               if any("model_service_worker" in part for part in p.cmdline())]
    assert len(workers) >= 2  # one per model at least
    for worker in workers:
        path = [Path(p) for p in worker.environ().get("PYTHONPATH", "").split(os.pathsep) if p]
        assert path and not any(p.resolve().is_relative_to(REPO) for p in path), path
    for name in ("ddsm", "adni"):
        r = requests.get(f"{torchserve.management_url}/models/{name}", params={"customized": "true"},
                         headers=torchserve.auth_header("management"), timeout=60)
        assert r.status_code == 200, r.text[:300]
        meta = r.json()[0]["customizedMetadata"]
        meta = json.loads(meta) if isinstance(meta, str) else meta
        assert meta["model"]["engine"] == _engine_json(model_store / f"{name}.mar")
        assert meta["model"]["engine"]["code_sha256"] == engine_record()["code_sha256"]
