"""The torch-free contract: heatmap encodings both ways, display decoding, geometry, key layout, response schema."""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medxplain_contract.encodings import (
    MapDecodeError,
    decode_2d,
    decode_3d,
    decode_map,
    encode_2d,
    encode_3d,
    map_bytes,
)
from medxplain_contract.layout import RunLayout, annotation_parts, parse_shard_key
from medxplain_contract.schema import KINDS, ValidationError, validate_response, validator
from tests import inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def _object_form(entry: dict, key: str) -> tuple[dict, bytes]:
    """What the batch job stores: ``data`` replaced by ``object``, the bytes in the object."""
    stored = {k: v for k, v in entry.items() if k != "data"}
    stored["object"] = key
    return stored, base64.b64decode(entry["data"])


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=FINITE))
def test_png_round_trip_within_one_step_in_both_forms(values):
    entry = encode_2d(values, "png")
    step = (entry["scale"]["max"] - entry["scale"]["min"]) / 255.0
    for decoded in (decode_2d(entry), decode_2d(*_object_form(entry, "heatmaps/cam.png")), decode_map(entry)):
        assert decoded.shape == values.shape and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, values, atol=step / 2 + 1e-3 * max(1.0, abs(values).max()))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=FINITE))
def test_float16_round_trip_is_float16_rounding_in_both_forms(values):
    entry = encode_2d(values, "float16")
    expected = values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(decode_2d(entry), expected)
    np.testing.assert_array_equal(decode_2d(*_object_form(entry, "heatmaps/cam.f16")), expected)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)), elements=FINITE),
       st.floats(0.5, 3.0), st.floats(-100, 100))
def test_nifti_round_trip_keeps_values_and_affine_in_both_forms(values, spacing, shift):
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = shift
    entry = encode_3d(values, affine)
    span = float(values.max() - values.min())
    for img in (decode_3d(entry), decode_3d(*_object_form(entry, "heatmaps/gradcam.nii.gz"))):
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)
        np.testing.assert_allclose(img.get_fdata(), values, atol=span / 510 + 1e-3 * max(1.0, span))
    assert decode_map(entry).shape == values.shape


def test_decoders_refuse_what_they_cannot_read():
    with pytest.raises(MapDecodeError, match="pass the bytes"):
        decode_2d({"encoding": "png", "object": "heatmaps/cam.png", "shape": [2, 2], "scale": {"min": 0, "max": 1}})
    with pytest.raises(MapDecodeError, match="unknown"):
        decode_map({"encoding": "jpeg2000", "data": "AAAA", "shape": [2, 2]})
    with pytest.raises(MapDecodeError, match="corrupt"):
        decode_2d({"encoding": "png", "data": base64.b64encode(b"not a png").decode(), "shape": [2, 2],
                   "scale": {"min": 0, "max": 1}})
    assert map_bytes({"data": base64.b64encode(b"abc").decode()}) == b"abc"


def test_ui_shows_a_dicom_through_its_modality_and_voi_luts_as_the_model_saw_it():
    from medxplain_contract.decoding import decode_image
    from ui.overlay import shown_pixels, to_uint8

    stored = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)
    slope, intercept, center, width = 0.5, -200.0, 600.0, 400.0
    raw = inputs.dicom_bytes(stored, RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US",
                             WindowCenter=center, WindowWidth=width)
    shown = shown_pixels(decode_image(raw).pixels)
    # DICOM PS3.3 C.11.2.1.2 linear VOI function over the rescaled values, written out independently
    value = stored * slope + intercept
    expected = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert shown.shape == stored.shape
    assert np.abs(shown.astype(int) - np.rint(expected * 255).astype(int)).max() <= 1
    naive = to_uint8(stored.astype(np.float32))  # what the UI used to show: raw stored values, re-windowed
    assert np.abs(naive.astype(int) - shown.astype(int)).max() > 100


def test_2d_maps_are_placed_by_the_recorded_frames_and_refused_in_the_wrong_one():
    from ui.geometry import GeometryError, place_2d

    heat = np.zeros((40, 60), np.float32)
    heat[:, 30:] = 1.0  # right half
    today = {"height": 40, "width": 60, "mode": "full_image", "analysed_size": [20, 30]}
    geometry = {"geometry": {"frame": "sent", "size": [40, 60], "analysed_size": [20, 30], "scale": 0.5}}
    for meta in (today, geometry):
        placed = place_2d(heat, meta, "analysed", (20, 30))
        assert placed.shape == (20, 30) and placed[:, :14].max() < 0.01 and placed[:, 16:].min() > 0.99
        assert place_2d(heat, meta, "sent", (40, 60)).shape == (40, 60)
        with pytest.raises(GeometryError, match="not the recorded analysed frame"):
            place_2d(heat, meta, "analysed", (40, 60))
    with pytest.raises(GeometryError, match="not in the recorded sent frame"):
        place_2d(heat[:20], today, "sent", (40, 60))
    with pytest.raises(GeometryError, match="no image size"):
        place_2d(heat, {"format": "png"}, "sent", (40, 60))


def test_3d_maps_are_resampled_by_their_affines_and_never_by_identity():
    from ui.geometry import GeometryError, place_3d, volume_affine

    heat = np.zeros((10, 10, 10), np.float32)
    heat[2, 3, 4] = 1.0
    sent = np.diag([2.0, 2.0, 2.0, 1.0])
    sent[:3, 3] = [-10, -10, -10]
    model = np.eye(4)
    model[:3, 3] = [-10, -10, -10]  # a 1 mm grid over the same world box
    placed = place_3d(nib.Nifti1Image(heat, sent), (20, 20, 20), model)
    assert tuple(int(v) for v in np.unravel_index(np.argmax(placed), placed.shape)) == (4, 6, 8)
    same = place_3d(nib.Nifti1Image(heat, sent), heat.shape, sent)
    np.testing.assert_array_equal(same, heat)
    assert volume_affine({"affine": sent.tolist()}).tolist() == sent.tolist()
    with pytest.raises(GeometryError, match="no affine"):
        volume_affine({"format": "nifti", "shape": [10, 10, 10]})


def test_run_layout_spells_every_key_once():
    run = RunLayout("runs/ddsm/")
    assert run.item("abc", "heatmaps/cam.png") == "runs/ddsm/items/abc/heatmaps/cam.png"
    assert (run.complete("abc"), run.failure("abc"), run.attempt("abc")) == (
        "runs/ddsm/items/abc/_complete.json", "runs/ddsm/failures/abc.json", "runs/ddsm/attempts/abc.json")
    assert run.shard(1, 4) == "runs/ddsm/shards/00001-of-00004.json" and parse_shard_key("shards/00001-of-00004.json") == (1, 4)
    assert (run.run_json, run.model_record, run.index("ids.json"), run.unit(7)) == (
        "runs/ddsm/run.json", "runs/ddsm/model/archive.json", "runs/ddsm/index/ids.json", "runs/ddsm/units/0007.json")
    assert run.relative(run.report) == "report.json" and RunLayout("").report == "report.json"
    assert run.listed_id("items", "runs/ddsm/items/abc/_complete.json", "/_complete.json") == "abc"
    assert run.listed_id("items", "runs/ddsm/items2/abc/_complete.json", "/_complete.json") is None
    assert annotation_parts("annotations/ddsm/v1/unit-0042/demo-a/2026.json") == (42, "demo-a")


def _response() -> dict:
    return {"api_version": "1",
            "model": {"name": "ddsm", "version": "1.0", "archive_digest": "a" * 64, "weights_sha256": "b" * 64,
                      "engine": {"version": "0.2.0", "code_sha256": "c" * 64}},
            "prediction": {"label": "benign", "label_index": 1,
                           "probabilities": {"normal": 0.2, "benign": 0.7, "malignant": 0.1}},
            "target": {"label": "benign", "index": 1},
            "input": {"format": "png", "bits": 8, "height": 227, "width": 227, "mode": "patch",
                      "geometry": {"frame": "sent", "size": [227, 227], "analysed_size": [227, 227], "scale": 1.0}},
            "units": [{"unit": 3, "rank": 1, "activation": 2.0, "weight": 0.5, "contribution": 1.0,
                       "weight_source": "classifier", "labels": []}],
            "heatmaps": {"cam": {"description": "class activation map",
                                 **encode_2d(np.ones((227, 227), np.float32), "png")}},
            "timing_ms": {"cam": 1.5}, "warnings": []}


def test_schema_files_are_valid_draft_2020_12_and_accept_the_contracts_own_bodies():
    for kind in KINDS:
        validator(kind)  # check_schema inside
    body = _response()
    assert validate_response(body) is body
    for required in ("engine", "geometry"):  # every response says which code drew it and in which frame
        broken = copy.deepcopy(body)
        del (broken["model"] if required == "engine" else broken["input"])[required]
        with pytest.raises(ValidationError):
            validate_response(broken)
    stored = copy.deepcopy(body)
    stored["heatmaps"]["cam"] = _object_form(stored["heatmaps"]["cam"], "heatmaps/cam.png")[0]
    stored["item"] = {"id": "0123abcd", "case_id": "c01", "truth": 1, "mask": "mask.png"}
    validate_response(stored, "batch_result")
    volume = encode_3d(np.zeros((4, 5, 6), np.float32), np.eye(4))
    grid = {"shape": [4, 5, 6], "affine": np.eye(4).tolist()}
    mri = {**body, "input": {"format": "nifti", "resampled": False, **grid,
                             "geometry": {"frame": "sent", **grid, "model_shape": grid["shape"],
                                          "model_affine": grid["affine"]}},
           "heatmaps": {"gradcam": volume}}
    validate_response(mri)
    validate_response({"code": 400, "error": "corrupt_image", "message": "could not decode the PNG image"}, "auto")


@pytest.mark.parametrize("breakage", ["no prediction", "map without data", "map in object form", "bad encoding",
                                      "png without scale", "probability is text", "error with raw input",
                                      "batch result with data", "geometry without size"])
def test_a_broken_body_fails_validation(breakage):
    body, kind = _response(), "response"
    if breakage == "no prediction":
        del body["prediction"]
    elif breakage == "map without data":
        del body["heatmaps"]["cam"]["data"]
    elif breakage == "map in object form":
        body["heatmaps"]["cam"]["object"] = "heatmaps/cam.png"
    elif breakage == "bad encoding":
        body["heatmaps"]["cam"]["encoding"] = "jpeg"
    elif breakage == "png without scale":
        del body["heatmaps"]["cam"]["scale"]
    elif breakage == "probability is text":
        body["prediction"]["probabilities"]["benign"] = "0.7"
    elif breakage == "error with raw input":
        body, kind = {"code": 400, "error": "bad_params", "message": "bad value \x1b[31mMRN"}, "error"
    elif breakage == "batch result with data":
        body["item"], kind = {"id": "x1", "case_id": "c", "truth": None}, "batch_result"
    elif breakage == "geometry without size":
        body["input"]["geometry"] = {"frame": "sent", "scale": 1.0}
    with pytest.raises(ValidationError):
        validate_response(body, kind)


def test_contract_ui_and_client_import_without_torch_or_the_layers_above():
    """The UI and the client run where torch is not installed: their imports never reach it."""
    blocked = ("torch", "torchvision", "captum", "batch", "model_store", "medxplain_engine", "medxplain_models",
               "handlers")
    modules = ["medxplain_contract.runs", "medxplain_contract.schema", "medxplain_contract.storage",
               "medxplain_client", "medxplain_client.outputs", "ui.data", "ui.runs", "ui.geometry", "ui.widgets",
               "ui.annotations", "ui.triplanar", "ui.serving"]
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}:\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {modules!r}:\n"
            "    __import__(m)\n"
            "print('imported', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("imported")
