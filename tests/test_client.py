"""medxplain_client against the session's real TorchServe: REST and gRPC agree, auth, errors, CLI files, retries."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from devstack.services import free_port
from medxplain_client import Client, ClientError, ConnectionFailed
from medxplain_client.__main__ import main as cli
from tests.schema_check import checked

CASES = {"ddsm": ("ddsm_data", "images.csv", "cam"), "adni": ("adni_data", "subjects.csv", "gradcam")}


def _test_file(request, model: str) -> Path:
    fixture, index, _ = CASES[model]
    data_dir = request.getfixturevalue(fixture)
    with open(data_dir / index, newline="") as f:
        return data_dir / next(r for r in csv.DictReader(f) if r["split"] == "test")["path"]


def _grpc_target(torchserve) -> str:
    return f"127.0.0.1:{torchserve.grpc_port}"


@pytest.fixture(autouse=True)
def _no_token_from_env(monkeypatch):
    monkeypatch.delenv("MEDXPLAIN_TOKEN", raising=False)


@pytest.fixture(scope="module")
def rest_client(torchserve):
    with Client(torchserve.inference_url, key_file=torchserve.key_file, timeout=300, retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(torchserve):
    with Client(grpc_target=_grpc_target(torchserve), key_file=torchserve.key_file, timeout=300, retries=0,
                transport="grpc") as client:
        yield client


@pytest.mark.parametrize("model", ["ddsm", "adni"])
def test_rest_and_grpc_give_the_same_prediction(request, model, rest_client, grpc_client):
    path = _test_file(request, model)
    over_rest = rest_client.predict(model, path, top_k=3)
    over_grpc = grpc_client.predict(model, path.read_bytes(), top_k=3)
    checked(over_rest, "response")
    checked(over_grpc, "response")
    assert over_grpc["model"] == over_rest["model"]
    assert over_grpc["prediction"]["label"] == over_rest["prediction"]["label"]
    for name, p in over_rest["prediction"]["probabilities"].items():
        assert over_grpc["prediction"]["probabilities"][name] == pytest.approx(p, abs=1e-5)
    assert [u["unit"] for u in over_grpc["units"]] == [u["unit"] for u in over_rest["units"]]
    assert "heatmaps" not in over_grpc


@pytest.mark.parametrize("model", ["ddsm", "adni"])
def test_explain_over_grpc_carries_the_method_in_the_input_map(request, model, grpc_client):
    method = CASES[model][2]
    result = checked(grpc_client.explain(model, _test_file(request, model), methods=[method], top_k=0), "response")
    assert list(result["heatmaps"]) == [method]
    heatmap = result["heatmaps"][method]
    assert heatmap["encoding"] == ("png" if model == "ddsm" else "nifti.gz") and heatmap["data"]


@pytest.mark.parametrize("token", [None, "not-the-key"])
def test_grpc_without_or_with_a_wrong_token_is_refused(request, torchserve, token):
    path = _test_file(request, "ddsm")
    with (Client(grpc_target=_grpc_target(torchserve), token=token, transport="grpc", retries=0) as client,
          pytest.raises(ClientError) as caught):
        client.predict("ddsm", path)
    # TorchServe 0.12 answers a missing or wrong token with gRPC PERMISSION_DENIED.
    assert caught.value.status == 403 and caught.value.error == "permission_denied"
    assert "token" in caught.value.message.lower()


def test_bad_input_over_grpc_is_a_client_error_with_the_servers_message(request, grpc_client):
    with pytest.raises(ClientError) as caught:
        grpc_client.predict("ddsm", b"\x89PNG\r\n\x1a\ntruncated")
    assert caught.value.is_client_fault and caught.value.attempts == 1
    assert caught.value.error and caught.value.message
    with pytest.raises(ClientError) as caught:
        grpc_client.explain("ddsm", _test_file(request, "ddsm"), methods="no-such-method")
    assert (caught.value.status, caught.value.error) == (400, "unknown_method")
    checked({"code": caught.value.status, "error": caught.value.error, "message": caught.value.message}, "error")
    assert "available" in caught.value.message
    with pytest.raises(ClientError) as caught:
        grpc_client.predict("no-such-model", b"x")
    assert caught.value.status == 404


def test_cli_writes_json_and_png_for_a_mammogram(request, torchserve, tmp_path, capsys):
    path = _test_file(request, "ddsm")
    code = cli(["explain", "--model", "ddsm", "--input", str(path), "--explain", "cam", "--top-k", "3",
                "--url", torchserve.inference_url, "--token-file", str(torchserve.key_file), "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / f"{path.stem}.ddsm.json").read_text())
    heatmap = result["heatmaps"]["cam"]
    assert "data" not in heatmap and heatmap["scale"]["max"] >= heatmap["scale"]["min"]
    with Image.open(tmp_path / heatmap["file"]) as png:
        assert png.size == (result["input"]["width"], result["input"]["height"])
    out = capsys.readouterr().out
    assert result["prediction"]["label"] in out and heatmap["file"] in out


def test_cli_writes_json_and_nifti_for_an_mri_over_grpc(request, torchserve, tmp_path):
    path = _test_file(request, "adni")
    code = cli(["explain", "--model", "adni", "--input", str(path), "--explain", "gradcam", "--top-k", "0",
                "--grpc", _grpc_target(torchserve), "--token-file", str(torchserve.key_file), "--out", str(tmp_path),
                "--timeout", "300"])
    assert code == 0
    result = json.loads((tmp_path / f"{path.name[:-7]}.adni.json").read_text())
    heatmap = nib.load(tmp_path / result["heatmaps"]["gradcam"]["file"])
    scan = nib.load(path)
    assert heatmap.shape == scan.shape
    np.testing.assert_allclose(heatmap.affine, scan.affine, atol=1e-4)
    assert result["regions"]["gradcam"]


def test_cli_exit_code_is_2_for_a_refused_request(request, torchserve, tmp_path, capsys):
    code = cli(["explain", "--model", "ddsm", "--input", str(_test_file(request, "ddsm")), "--explain", "nope",
                "--url", torchserve.inference_url, "--token-file", str(torchserve.key_file), "--out", str(tmp_path)])
    assert code == 2
    assert "unknown_method" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_unreachable_server_is_retried_with_backoff_then_reported(transport):
    port = free_port()  # nothing listens there
    client = Client(f"http://127.0.0.1:{port}", grpc_target=f"127.0.0.1:{port}", transport=transport, retries=2,
                    backoff=0.1, timeout=5)
    started = time.monotonic()
    with pytest.raises(ClientError) as caught:
        client.predict("ddsm", b"anything")
    elapsed = time.monotonic() - started
    client.close()
    assert caught.value.attempts == 3 and caught.value.retryable and not caught.value.is_client_fault
    assert elapsed >= 0.1 + 0.2  # the two pauses before the retries
    if transport == "rest":
        assert isinstance(caught.value, ConnectionFailed)
