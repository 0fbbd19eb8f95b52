"""Where a request's time goes is in every response (timing_ms, Server-Timing), and the hot-path
changes of issue 13 left the results as they were."""

from __future__ import annotations

import base64
import copy
import csv
import io

import numpy as np
import pytest
import requests
from jsonschema import ValidationError
from PIL import Image

from devstack.bench import server_timing
from devstack.services import BASE_TORCHSERVE_CONFIG, TorchServeServer, read_properties
from medxplain_contract.encodings import decode_2d, encode_2d
from medxplain_contract.schema import validate_response
from medxplain_engine.engine import Engine, EngineRequest
from tests import inputs
from tests.schema_check import checked

ENGINE_STAGES = ("prepare", "forward", "serialise")


def _full_image(ddsm_data) -> bytes:
    with open(ddsm_data / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (ddsm_data / row["path"]).read_bytes()


def _post(torchserve, endpoint: str, payload: bytes) -> requests.Response:
    r = requests.post(f"{torchserve.inference_url}/{endpoint}/ddsm", data=payload, headers=torchserve.auth_header(),
                      timeout=300)
    assert r.status_code == 200, r.text
    return r


def test_rest_responses_carry_engine_stages_and_the_handler_share(torchserve, ddsm_data):
    for endpoint, payload, method in (("predictions", inputs.patch_png(), None),
                                      ("explanations", _full_image(ddsm_data), "cam")):
        r = _post(torchserve, endpoint, payload)
        timing = checked(r, "response")["timing_ms"]
        stages = [*ENGINE_STAGES, "units", *([method] if method else [])]
        assert set(stages) <= set(timing), timing
        assert all(timing[s] >= 0 for s in stages)
        header = server_timing(r.headers.get("Server-Timing"))
        assert set(header) == {"parse", "json", "handler"}, r.headers
        # the handler call contains every engine stage of its row (each rounded to 0.1 ms)
        assert header["handler"] + 0.1 * len(stages) >= sum(timing[s] for s in stages) + header["parse"]


def test_batch_results_carry_the_same_stages(ddsm_bundle):
    engine = Engine.from_model_dir(ddsm_bundle[0])
    items = [engine.prepare_isolated(EngineRequest(inputs.patch_png(seed), {"explain": "cam"})) for seed in (1, 2)]
    for result in engine.run_prepared(items, with_features=True):
        timing = result.response["timing_ms"]
        assert {*ENGINE_STAGES, "units", "cam"} <= set(timing)
        assert result.features is not None


def test_schema_documents_the_stages_and_refuses_bad_values(ddsm_bundle):
    engine = Engine.from_model_dir(ddsm_bundle[0])
    (body,) = engine.run([EngineRequest(inputs.patch_png(3))])
    validate_response(body, kind="response")
    for stage, value in (("prepare", -1.0), ("forward", "fast")):
        bad = copy.deepcopy(body)
        bad["timing_ms"][stage] = value
        with pytest.raises(ValidationError):
            validate_response(bad, kind="response")


def test_png_maps_decode_to_the_same_pixels_as_before_the_faster_compression():
    """encode_2d dropped PNG ``optimize=True`` (ten times slower on a full mammogram's map): the pixels
    a client decodes are the ones the old encoding gave."""
    rng = np.random.default_rng(5)
    smooth = np.kron(rng.random((40, 26)), np.ones((35, 35), np.float32))[:1400, :908]
    for values in (smooth, rng.normal(size=(227, 227)).astype(np.float32)):
        entry = encode_2d(values, "png")
        lo, hi = entry["scale"]["min"], entry["scale"]["max"]
        q = np.clip(np.rint((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(q).save(buf, format="PNG", optimize=True)  # the encoding before issue 13
        before = {**entry, "data": base64.b64encode(buf.getvalue()).decode()}
        assert np.array_equal(decode_2d(entry), decode_2d(before))


def test_devstack_torchserve_runs_on_the_image_settings(tmp_path):
    """services.TorchServeServer changes only addresses, ports and folders of docker/serve/config.properties."""
    image = read_properties(BASE_TORCHSERVE_CONFIG)
    local = TorchServeServer(workdir=tmp_path, model_store=tmp_path, models={"ddsm": "ddsm.mar"}).config()
    local_only = {"inference_address", "management_address", "metrics_address", "grpc_inference_address",
                  "grpc_inference_port", "grpc_management_address", "grpc_management_port", "model_store",
                  "workflow_store", "allowed_urls", "load_models"}
    assert {k: v for k, v in local.items() if k not in local_only} == {
        k: v.replace("file:///opt/medxai/", f"file://{BASE_TORCHSERVE_CONFIG.parent}/")
        for k, v in image.items() if k not in local_only}
    assert "disable_system_metrics" in local and (BASE_TORCHSERVE_CONFIG.parent / "log4j2.xml").is_file()
