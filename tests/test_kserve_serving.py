"""The KServe runtime (python -m medxplain_kserve) serves the same archives as TorchServe, with the same answers.

Both real servers run on loopback (tests/conftest.py). Equality is checked on the JSON body minus
``timing_ms`` (wall times), so heatmap bytes (base64 in the JSON, typed tensors on the side) must match.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import json
import re

import grpc
import numpy as np
import pytest
import requests

from medxplain_client import Client, ClientError
from medxplain_contract.encodings import decode_map
from tests import hostile, inputs
from tests.kserve_support import grpc_answer, grpc_transport, v1_rest, v2_rest, v2_result, v2_tensors
from tests.schema_check import checked
from tests.test_bad_input import DDSM_CASES, _post

PATCH = inputs.patch_png()
FIELDS = {"explain": "gradcam,cam", "encoding": "float16", "top_k": "3"}


def _untimed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timing_ms"}


def _same_up_to_rounding(a, b, tol: float = 1e-4) -> bool:
    """Equal apart from float rounding: a batched forward and a single one take different oneDNN kernels."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_up_to_rounding(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_up_to_rounding(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def _volume(adni_data) -> bytes:
    with open(adni_data / "subjects.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (adni_data / row["path"]).read_bytes()


def test_health_and_metadata(kserve):
    for path in ("/v2/health/live", "/v2/health/ready"):  # probes are open, as TorchServe's /ping
        assert requests.get(kserve.inference_url + path, timeout=30).status_code == 200
    meta = requests.get(f"{kserve.inference_url}/v2/models/ddsm", headers=kserve.auth_header(), timeout=30).json()
    assert meta["name"] == "ddsm" and meta["inputs"] == [{"name": "data", "datatype": "BYTES", "shape": [1]}]
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert outputs["result"] == "BYTES" and outputs["heatmap_gradcam"] == "FP16"
    ready = requests.get(f"{kserve.inference_url}/v2/models/adni/ready", headers=kserve.auth_header(), timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    missing = requests.get(f"{kserve.inference_url}/v2/models/nope/ready", headers=kserve.auth_header(), timeout=30)
    assert missing.status_code == 404
    t = grpc_transport(kserve)
    pb = t.pb
    assert t.stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    assert t.stub.ModelReady(pb.ModelReadyRequest(name="ddsm"), timeout=30, metadata=t.metadata).ready
    grpc_meta = t.stub.ModelMetadata(pb.ModelMetadataRequest(name="adni"), timeout=30, metadata=t.metadata)
    assert [i.name for i in grpc_meta.inputs] == ["data"]


@pytest.mark.parametrize("model", ["ddsm", "adni"])
def test_same_answers_as_torchserve_on_every_transport(torchserve, kserve, adni_data, model):
    payload = PATCH if model == "ddsm" else _volume(adni_data)
    fields = FIELDS if model == "ddsm" else {"explain": "gradcam", "top_k": "3"}
    ts = _post(torchserve, model, fields={"data": payload, **fields})
    assert ts.status_code == 200, ts.text[:300]
    expected = _untimed(checked(ts, "response"))
    with Client(kserve.inference_url, token=kserve.token(), transport="oip-rest") as rest, \
         Client(grpc_target=kserve.grpc_target, token=kserve.token(), transport="oip-grpc") as grpc_client:
        for client in (rest, grpc_client):
            got = client.predict(model, payload, **fields)
            checked(got, "response")
            assert _untimed(got) == expected  # same JSON: same probabilities, units, heatmap bytes
    instance = {"data": base64.b64encode(payload).decode(), **fields}
    v1 = v1_rest(kserve, model, instance)
    assert v1.status_code == 200, v1.text[:300]
    assert _untimed(v1.json()["predictions"][0]) == expected


def test_heatmaps_as_typed_tensors(torchserve, kserve, adni_data):
    """FP16 maps: the very bytes TorchServe sends in base64; other encodings: FP32 true values; shapes as sent."""
    ts = _post(torchserve, "ddsm", fields={"data": PATCH, **FIELDS}).json()
    r = v2_rest(kserve, "ddsm", PATCH, FIELDS, outputs=("heatmaps",))
    assert r.status_code == 200, r.text[:300]
    tensors = v2_tensors(r)
    assert set(tensors) == {"result", "heatmap_cam", "heatmap_gradcam"}
    for method in ("cam", "gradcam"):
        dtype, shape, raw = tensors[f"heatmap_{method}"]
        entry = ts["heatmaps"][method]
        assert dtype == "FP16" and shape == entry["shape"] == [227, 227]
        assert raw == base64.b64decode(entry["data"])  # byte-identical to TorchServe's
    assert _untimed(v2_result(r)) == _untimed(ts)
    # gRPC: one named map, raw output contents
    t = grpc_transport(kserve)
    reply = t.infer(t.request("ddsm", PATCH, FIELDS, False, ("result", "heatmap_gradcam")))
    names = [o.name for o in reply.outputs]
    assert names == ["result", "heatmap_gradcam"] and list(reply.outputs[1].shape) == [227, 227]
    assert reply.raw_output_contents[1] == base64.b64decode(ts["heatmaps"]["gradcam"]["data"])
    # 3D maps (nifti.gz in the JSON) come as FP32 volumes of their true values
    volume = _volume(adni_data)
    ts3 = _post(torchserve, "adni", fields={"data": volume, "explain": "gradcam"}).json()
    reply = t.infer(t.request("adni", volume, {"explain": "gradcam"}, False, ("heatmaps",)))
    out = reply.outputs[1]
    assert (out.name, out.datatype, list(out.shape)) == ("heatmap_gradcam", "FP32", ts3["heatmaps"]["gradcam"]["shape"])
    values = np.frombuffer(reply.raw_output_contents[1], "<f4").reshape(out.shape)
    assert np.array_equal(values, decode_map(ts3["heatmaps"]["gradcam"]))


def _kserve_case(kserve, case: dict) -> hostile.Answer:
    """A test_bad_input case sent the OIP way: a JSON body as a v1 instance, fields as inputs/parameters."""
    if "json_body" in case:
        r = v1_rest(kserve, "ddsm", case["json_body"])
        return hostile.Answer(r.status_code, r.content)
    if "fields" in case:
        fields = dict(case["fields"])
        data = fields.pop("data")
        text = {k: v for k, v in fields.items() if isinstance(v, bytes)}
        params = {k: v for k, v in fields.items() if not isinstance(v, bytes)}
        r = v2_rest(kserve, "ddsm", data, params, text_inputs=text)
    else:
        r = v2_rest(kserve, "ddsm", case["body"])
    return hostile.Answer(r.status_code, r.content)


# Cases whose bytes differ by transport: TorchServe decodes a text/* body as UTF-8 before the handler
# sees it; OIP carries the bytes as sent. Both are refused; the reason may differ.
TRANSPORT_DEPENDENT = {"non-utf8 text body", "non-latin text body"}


def test_bad_input_matrix_same_errors_as_torchserve(torchserve, kserve):
    mismatches = []
    for name, case in sorted(DDSM_CASES.items()):
        kwargs = {k: v for k, v in case.items() if v is not None}
        ts = _post(torchserve, "ddsm", **kwargs)
        ks = _kserve_case(kserve, kwargs)
        body = hostile.check_answer(ks)
        assert 400 <= ks.status < 500, (name, ks.status, ks.body[:200])
        if name not in TRANSPORT_DEPENDENT and (ks.status, body["error"]) != (ts.status_code, ts.json()["error"]):
            mismatches.append((name, ks.status, body["error"], ts.status_code, ts.json()["error"]))
    assert not mismatches, mismatches
    ok = v2_rest(kserve, "ddsm", PATCH)
    assert ok.status_code == 200


def test_bad_input_over_grpc(kserve):
    t = grpc_transport(kserve)
    for body, params, error in ((b"hello", {}, "unknown_format"), (PATCH, {"top_k": "many"}, "bad_parameter"),
                                (PATCH, {"explain": b"\xff\xfe"}, "bad_parameter"),
                                (PATCH, {"explian": "cam"}, "unknown_parameter")):
        answer = grpc_answer(t, "ddsm", body, params)
        got = hostile.check_answer(answer)
        assert 400 <= answer.status < 500 and got["error"] == error, got
    assert grpc_answer(t, "ddsm", PATCH, {}).status == 200


def test_messages_never_echo_the_input(kserve):
    r = v2_rest(kserve, "ddsm", PATCH, {"MRN123_DOE_JANE_" + "x" * 4000: "1"})
    assert r.status_code == 400 and "MRN" not in r.text and r.json()["error"] == "unknown_parameter"
    r = v2_rest(kserve, "ddsm", b"MRN987_SMITH \xff\x00 not an image")
    assert 400 <= r.status_code < 500 and "MRN" not in r.text
    assert "MRN" not in kserve.log_path.read_text(errors="replace")


def test_token_auth_rest_and_grpc(kserve):
    url = f"{kserve.inference_url}/v2/models/ddsm"
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": kserve.token()}):
        r = requests.get(url, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    assert v2_rest(kserve, "ddsm", PATCH, token="wrong-token-0123456789").status_code == 401
    r = requests.post(f"{kserve.inference_url}/v1/models/ddsm:predict", json={"instances": []}, timeout=30)
    assert r.status_code == 401
    for token in ("", "wrong-token-0123456789"):
        t = grpc_transport(kserve, token=token)
        with pytest.raises(ClientError) as err:
            t.infer(t.request("ddsm", PATCH, {}, False))
        assert err.value.status == 401
        with pytest.raises(grpc.RpcError) as rpc:
            t.stub.ModelMetadata(t.pb.ModelMetadataRequest(name="ddsm"), timeout=30, metadata=t.metadata)
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_size_limits(kserve):
    big = b"\x00" * (64 * 1024 * 1024 + 1)
    r = requests.post(f"{kserve.inference_url}/v2/models/ddsm/infer", data=big, headers=kserve.auth_header(),
                      timeout=120)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(65):
            yield b"\x00" * (1024 * 1024)

    r = requests.post(f"{kserve.inference_url}/v2/models/ddsm/infer", data=chunks(), headers=kserve.auth_header(),
                      timeout=120)
    assert r.status_code == 413 and r.json()["code"] == 413
    t = grpc_transport(kserve)
    with pytest.raises(ClientError) as err:
        t.infer(t.request("ddsm", big, {}, False))
    assert err.value.status == 413  # RESOURCE_EXHAUSTED


def test_dynamic_batching_keeps_rows_isolated(kserve):
    """Concurrent requests share engine calls; a bad one among them fails alone."""
    bodies = [inputs.patch_png(seed) for seed in range(6)] + [b"not an image", PATCH[:100]]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: v2_rest(kserve, "ddsm", b, {"top_k": 2}), bodies))
    assert [a.status_code for a in answers[:6]] == [200] * 6
    assert all(400 <= a.status_code < 500 for a in answers[6:])
    alone = v2_result(v2_rest(kserve, "ddsm", bodies[3], {"top_k": 2}))
    # the same answer as alone, up to the float rounding of a batch's kernels (the same holds on TorchServe)
    batched = _untimed(v2_result(answers[3]))
    assert _same_up_to_rounding(batched, _untimed(alone)), (batched["prediction"], alone["prediction"])
    sizes = [int(n) for n in re.findall(r"dynamic batch of (\d+) rows", kserve.log_path.read_text())]
    assert sizes and max(sizes) > 1, "no dynamic batch was formed"


def test_metrics_endpoint(kserve):
    v2_rest(kserve, "ddsm", PATCH)  # the test counts its own request: it must not rest on earlier tests
    v2_rest(kserve, "adni", b"\x00" * 400)
    text = requests.get(f"{kserve.inference_url}/metrics", timeout=30).text
    assert re.search(r'request_predict_seconds_count\{model_name="ddsm"\} [1-9]', text), text[:500]
    assert "request_preprocess_seconds" in text


def test_v1_several_instances(kserve):
    good = {"data": base64.b64encode(PATCH).decode()}
    r = requests.post(f"{kserve.inference_url}/v1/models/ddsm:predict", headers=kserve.auth_header(), timeout=300,
                      json={"instances": [good, {"data": "%%%"}, good]})
    assert r.status_code == 200
    first, bad, last = r.json()["predictions"]
    assert bad == {"code": 400, "error": "bad_payload", "message": "JSON field 'data' is not valid base64"}
    assert _untimed(first) == _untimed(last)
    assert json.loads(v1_rest(kserve, "ddsm", [1, 2]).content)["error"] == "bad_json_body"


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_cli_over_oip(kserve, tmp_path, transport):
    from medxplain_client.__main__ import main as cli

    path = tmp_path / "patch.png"
    path.write_bytes(PATCH)
    where = ["--url", kserve.inference_url] if transport == "rest" else ["--grpc", kserve.grpc_target]
    code = cli(["explain", "--model", "ddsm", "--input", str(path), "--explain", "cam", "--oip", *where,
                "--token-file", str(kserve.token_file), "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "patch.ddsm.json").read_text())
    assert (tmp_path / "out" / result["heatmaps"]["cam"]["file"]).is_file()
    with pytest.raises(ClientError) as err, Client(grpc_target=kserve.grpc_target, token=kserve.token(),
                                                   transport="oip-grpc", retries=0) as client:
        client.predict("no-such-model", PATCH)
    assert err.value.status == 404


def test_auth_must_be_chosen_and_no_auth_is_explicit(model_store, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from devstack.services import KServeServer, ServiceError

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "medxplain_kserve", "--model-store", str(model_store)],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 2 and "--token-file" in proc.stderr and "--no-auth" in proc.stderr
    store = tmp_path / "store"  # an archive that does not match its digest file never loads
    store.mkdir()
    (store / "ddsm.mar").write_bytes((model_store / "ddsm.mar").read_bytes() + b"\x00")
    (store / "ddsm.mar.sha256").write_text((model_store / "ddsm.mar.sha256").read_text())
    with pytest.raises(ServiceError, match="does not match"):
        KServeServer(workdir=tmp_path / "bad", model_store=store, models=("ddsm",), token_auth=False).start(timeout=120)
    open_server = KServeServer(workdir=tmp_path / "open", model_store=model_store, models=("ddsm",), token_auth=False)
    try:
        open_server.start()
        assert v2_rest(open_server, "ddsm", PATCH).status_code == 200  # no token needed with --no-auth
        assert "token auth OFF" in open_server.log_path.read_text()
    finally:
        open_server.stop()
