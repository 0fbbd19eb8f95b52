"""Heatmaps, units and region tables over the real TorchServe, checked against ground truth."""

from __future__ import annotations

import csv
import json
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from medxplain_contract.encodings import decode_2d, decode_3d
from medxplain_engine.engine import Engine, EngineRequest
from model_store.evaluate import DDSM_TOLERANCE_PX, dilate, pointing_game
from tests import inputs


def _rows(data_dir: Path, index: str) -> list[dict]:
    with open(data_dir / index, newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


def _all_rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "images.csv", newline="") as f:
        return list(csv.DictReader(f))


def _post(server, model: str, payload: bytes, endpoint: str = "predictions", **fields) -> dict:
    files = {"data": ("data", payload), **{k: (None, str(v)) for k, v in fields.items()}}
    r = requests.post(f"{server.inference_url}/{endpoint}/{model}", files=files, headers=server.auth_header(),
                      timeout=600)
    assert r.status_code == 200, r.text[:400]
    return r.json()


def _lesion_image(ddsm_data: Path) -> dict:
    return next(r for r in _rows(ddsm_data, "images.csv") if int(r["label"]) > 0)


@pytest.mark.parametrize("method", ["cam", "gradcam", "saliency", "guided_backprop"])
def test_ddsm_full_image_heatmaps(torchserve, ddsm_data, method):
    row = _lesion_image(ddsm_data)
    image = np.asarray(Image.open(ddsm_data / row["path"]))
    body = _post(torchserve, "ddsm", (ddsm_data / row["path"]).read_bytes(), explain=method, top_k=5)
    heat = decode_2d(body["heatmaps"][method])
    assert heat.shape == image.shape
    assert np.isfinite(heat).all() and heat.max() > heat.min()
    assert [u["rank"] for u in body["units"]] == [1, 2, 3, 4, 5]
    contributions = [u["contribution"] for u in body["units"]]
    assert contributions == sorted(contributions, reverse=True)


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_ddsm_patch_heatmaps_both_encodings(torchserve, method):
    patch = inputs.patch_png(5)
    for encoding in ("png", "float16"):
        body = _post(torchserve, "ddsm", patch, explain=method, encoding=encoding, ig_steps=4)
        heat = decode_2d(body["heatmaps"][method])
        assert heat.shape == (227, 227) and body["heatmaps"][method]["encoding"] == encoding


def test_ddsm_cam_points_at_the_lesion_more_often_than_chance(torchserve, ddsm_data):
    """Pointing game of CAM on the held-out lesion images the model classifies correctly.

    A map can only be expected to show a lesion for a decision the model got right: an image called
    normal gets the normal class's map. So the cases are the test split's lesion images whose served
    label is the true class (the map then explains that class), scored with the evaluation's
    pointing game (15 px tolerance at the sent image's scale, tied maxima pro rata). Chance is the
    share of the image within 15 px of the lesion, computed from the same masks. None correct is a
    failure, not a skip: the validation bar of training is there to rule it out.
    """
    cases, chance = [], []
    for row in (r for r in _rows(ddsm_data, "images.csv") if int(r["label"]) > 0):
        body = _post(torchserve, "ddsm", (ddsm_data / row["path"]).read_bytes(), explain="cam", top_k=0)
        if body["prediction"]["label_index"] != int(row["label"]):
            continue
        assert body["target"]["index"] == int(row["label"])
        mask = np.asarray(Image.open(ddsm_data / row["mask_path"])) > 0
        cases.append((row["image_id"], pointing_game(decode_2d(body["heatmaps"]["cam"]), mask, DDSM_TOLERANCE_PX)))
        chance.append(float(dilate(mask, DDSM_TOLERANCE_PX).mean()))
    assert cases, "no held-out lesion image is classified correctly: the training validation bar is too weak"
    score = np.mean([hit for _, hit in cases])
    assert score >= max(0.5, 10 * np.mean(chance)), (score, np.mean(chance), cases)


def test_ddsm_unit_maps_share_one_scale(torchserve):
    body = _post(torchserve, "ddsm", inputs.patch_png(1), top_k=3, unit_maps="true")
    scales = {json.dumps(m["scale"]) for m in body["unit_maps"].values()}
    assert len(body["unit_maps"]) == 3 and len(scales) == 1
    assert set(body["unit_maps"]) == {str(u["unit"]) for u in body["units"]}


ADNI_METHODS = {"gradcam": {}, "sensitivity": {}, "guided_backprop": {}, "integrated_gradients": {"ig_steps": 4},
                "area_occlusion": {}, "occlusion": {"occlusion_size": 20, "occlusion_stride": 16}}


@pytest.mark.parametrize("method", sorted(ADNI_METHODS))
def test_adni_heatmaps_keep_the_affine_and_report_regions(torchserve, adni_data, method):
    row = next(r for r in _rows(adni_data, "subjects.csv") if r["label_name"] == "AD")
    scan = nib.load(adni_data / row["path"])
    body = _post(torchserve, "adni", (adni_data / row["path"]).read_bytes(), explain=method, **ADNI_METHODS[method])
    heat = decode_3d(body["heatmaps"][method])
    assert heat.shape == scan.shape
    assert np.allclose(heat.affine, scan.affine)
    values = np.asarray(heat.dataobj)
    assert np.isfinite(values).all()
    scale = body["heatmaps"][method]["scale"]
    assert values.max() == pytest.approx(scale["max"], rel=1e-3, abs=1e-6)
    regions = body["regions"][method]
    assert [r["rank"] for r in regions] == list(range(1, len(regions) + 1))
    assert all(r["voxels"] > 0 for r in regions)


def test_adni_resampled_input_gets_maps_on_its_own_grid(torchserve, adni_data):
    row = _rows(adni_data, "subjects.csv")[0]
    scan = nib.load(adni_data / row["path"])
    data = np.asarray(scan.dataobj, np.float32)[4:-4, 4:-4, 4:-4]  # cropped: a different grid
    affine = scan.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([4, 4, 4])
    body = _post(torchserve, "adni", inputs.nifti_bytes(data, affine), explain="gradcam")
    assert body["input"]["resampled"] is True and body["warnings"]
    heat = decode_3d(body["heatmaps"]["gradcam"])
    assert heat.shape == data.shape and np.allclose(heat.affine, affine)


def test_gradcam_layer_is_a_parameter(torchserve, adni_data):
    """Grad-CAM on an earlier block: another map, zero off the brain, and the response names its layer."""
    row = next(r for r in _rows(adni_data, "subjects.csv") if r["label_name"] == "AD")
    scan = (adni_data / row["path"]).read_bytes()
    maps = {}
    for layer in ("relu_2", "relu_4", None):
        body = _post(torchserve, "adni", scan, explain="gradcam", **({"gradcam_layer": layer} if layer else {}))
        assert body["heatmaps"]["gradcam"]["layer"] == (layer or "relu_4")
        maps[layer] = np.asarray(decode_3d(body["heatmaps"]["gradcam"]).dataobj)
    assert np.array_equal(maps[None], maps["relu_4"])  # the default is the last block
    assert not np.allclose(maps["relu_2"], maps["relu_4"])  # another layer, another map
    outside = np.asarray(nib.load(adni_data / row["path"]).dataobj) == 0  # the synthetic scans are 0 off the brain
    for layer_map in maps.values():  # nothing is relevant where the model's input is always 0
        assert layer_map[outside].max() == 0 and layer_map.max() > 0
    body = _post(torchserve, "ddsm", inputs.patch_png(5), explain="gradcam", gradcam_layer="layer3")
    assert body["heatmaps"]["gradcam"]["layer"] == "layer3"
    for model, payload, layer in (("adni", scan, "layer4"), ("ddsm", inputs.patch_png(5), "relu_2")):
        r = requests.post(f"{torchserve.inference_url}/predictions/{model}", headers=torchserve.auth_header(),
                          files={"data": ("data", payload), "explain": (None, "gradcam"), "gradcam_layer": (None, layer)},
                          timeout=600)
        assert r.status_code == 400 and r.json()["error"] == "bad_parameter", r.text[:200]
        assert layer not in r.json()["message"].split("must be")[0]


def test_online_and_in_process_results_are_identical(torchserve, model_store, ddsm_data, adni_data):
    cases = [("ddsm", (ddsm_data / _lesion_image(ddsm_data)["path"]).read_bytes(), {"explain": "cam,gradcam"}),
             ("adni", (adni_data / _rows(adni_data, "subjects.csv")[0]["path"]).read_bytes(),
              {"explain": "gradcam", "unit_maps": "true"})]
    for model, payload, params in cases:
        online = _post(torchserve, model, payload, **params)
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(model_store / f"{model}.mar") as zf:
                zf.extractall(tmp)
            local = Engine.from_model_dir(Path(tmp)).run([EngineRequest(payload, params)])[0]
        local = json.loads(json.dumps(local))
        online.pop("timing_ms")
        local.pop("timing_ms")
        assert online == local


def test_dicom_patient_identifiers_never_leak(torchserve, ddsm_data):
    row = next(r for r in _all_rows(ddsm_data) if r["dicom_path"])
    ds = pydicom.dcmread(ddsm_data / row["dicom_path"])
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.PatientName).split("^")[-1]]
    body = _post(torchserve, "ddsm", (ddsm_data / row["dicom_path"]).read_bytes(), explain="cam")
    assert body["input"]["format"] == "dicom"
    text = json.dumps(body)
    bad = inputs.dicom_bytes(np.ones((300, 260), np.uint16), patient_name="LEAK^CANARY", patient_id="CANARY-42")
    requests.post(f"{torchserve.inference_url}/predictions/ddsm", data=bad[:-3000], headers=torchserve.auth_header(),
                  timeout=60)
    logs = "".join(p.read_text(errors="replace") for p in (torchserve.workdir / "logs").glob("*"))
    for secret in [*secrets, "LEAK^CANARY", "CANARY-42"]:
        assert secret not in text and secret not in logs, secret


def test_monochrome1_is_inverted(torchserve):
    rng = np.random.default_rng(0)
    pixels = (rng.random((227, 227)) * 4000).astype(np.uint16)
    mono2 = _post(torchserve, "ddsm", inputs.dicom_bytes(pixels), top_k=0)
    mono1 = _post(torchserve, "ddsm", inputs.dicom_bytes(pixels.max() - pixels, photometric="MONOCHROME1"), top_k=0)
    assert mono1["prediction"]["probabilities"] == pytest.approx(mono2["prediction"]["probabilities"], abs=1e-4)
