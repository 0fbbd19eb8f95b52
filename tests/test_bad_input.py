"""Every malformed request gets a 4xx with a message, and the worker answers the next valid one."""

from __future__ import annotations

import base64
import csv

import nibabel as nib
import numpy as np
import pytest
import requests

from tests import hostile, inputs
from tests.schema_check import checked

RNG = np.random.default_rng(3)
IMG8 = (RNG.random((300, 260)) * 255).astype(np.uint8)
PATCH = inputs.patch_png()


def _post(server, model: str, *, body: bytes | None = None, fields: dict | None = None, json_body=None,
          endpoint: str = "predictions", content_type: str | None = None) -> requests.Response:
    url = f"{server.inference_url}/{endpoint}/{model}"
    headers = server.auth_header()
    if content_type:
        headers["Content-Type"] = content_type
    if json_body is not None:
        return requests.post(url, json=json_body, headers=headers, timeout=120)
    if fields is not None:
        files = {k: (k, v) if isinstance(v, bytes) else (None, v) for k, v in fields.items()}
        return requests.post(url, files=files, headers=headers, timeout=120)
    return requests.post(url, data=body, headers=headers, timeout=120)


def _valid_volume(adni_data) -> bytes:
    with open(adni_data / "subjects.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (adni_data / row["path"]).read_bytes()


DDSM_CASES = {
    "empty body": {"body": b""},
    "text body": {"body": b"hello, this is not an image"},
    "truncated png": {"body": PATCH[:200]},
    "png bad crc": {"body": PATCH[:60] + b"\x00" * 40 + PATCH[100:]},
    "corrupt jpeg": {"body": inputs.jpeg_bytes(IMG8)[:150]},
    "truncated tiff": {"body": inputs.tiff_bytes(IMG8)[:120]},
    "corrupt dicom": {"body": b"\x00" * 128 + b"DICM" + b"\x02\x00garbage" * 10},
    "dicom without pixels": {"body": inputs.dicom_bytes(None)},
    "dicom truncated pixels": {"body": inputs.dicom_bytes(np.ones((300, 260), np.uint16))[:-5000]},
    "nifti to mammography": {"body": inputs.nifti_bytes(np.zeros((10, 10, 10), np.float32), np.eye(4))},
    "absurd png size": {"body": inputs.png_header_only(100_000, 100_000)},
    "tiny image": {"body": inputs.png_bytes(np.zeros((8, 8), np.uint8))},
    "nan float tiff": {"body": inputs.tiff_bytes(np.full((300, 260), np.nan, np.float32))},
    "json bad base64": {"json_body": {"data": "%%%not-base64%%%"}},
    "json data not string": {"json_body": {"data": 12}},
    "json without data": {"json_body": {"top_k": 3}},
    "params not json": {"fields": {"data": PATCH, "params": "{not json"}},
    "unknown parameter": {"fields": {"data": PATCH, "explian": "cam"}},
    "unknown method": {"fields": {"data": PATCH, "explain": "magic"}},
    "top_k negative": {"fields": {"data": PATCH, "top_k": "-1"}},
    "top_k not a number": {"fields": {"data": PATCH, "top_k": "many"}},
    "target out of range": {"fields": {"data": PATCH, "target": "7"}},
    "bad encoding": {"fields": {"data": PATCH, "explain": "cam", "encoding": "jpeg"}},
    "occlusion window too big": {"fields": {"data": PATCH, "explain": "occlusion", "occlusion_size": "250"}},
    "occlusion too expensive": {"fields": {"data": PATCH, "explain": "occlusion", "occlusion_size": "4",
                                            "occlusion_stride": "1"}},
    # the classes of issue 10: each one answered 500/503 or killed the worker before
    "explain is a number": {"json_body": {"data": base64.b64encode(PATCH).decode(), "explain": 3}},
    "explain is a boolean": {"json_body": {"data": base64.b64encode(PATCH).decode(), "explain": True}},
    "top_k is a boolean": {"json_body": {"data": base64.b64encode(PATCH).decode(), "top_k": True}},
    "top_k is a list": {"json_body": {"data": base64.b64encode(PATCH).decode(), "top_k": [3]}},
    "ig_steps huge number": {"json_body": {"data": base64.b64encode(PATCH).decode(), "ig_steps": 10**30}},
    "top_k infinite": {"body": None, "fields": {"data": PATCH, "top_k": "1e999"}},
    "params is a JSON list": {"fields": {"data": PATCH, "params": "[1, 2]"}},
    "non-utf8 multipart field": {"fields": {"data": PATCH, "explain": b"\xff\xfe\xfa"}},
    "non-utf8 params field": {"fields": {"data": PATCH, "params": b"{\"top_k\": \"\xff\"}"}},
    "non-utf8 text body": {"body": b"\xff\xfe not utf-8 \x80", "content_type": "text/plain"},
    "non-latin text body": {"body": "h\u00e9llo \u20ac \u4e2d".encode(), "content_type": "text/plain"},
    "json body is a list": {"json_body": [1, 2, 3]},
    "long thin image": {"body": inputs.png_bytes(np.zeros((32, 4000), np.uint8))},
    "deeply nested dicom": {"body": inputs.nested_dicom(60)},
    "dicom multi-valued rows": {"body": inputs.dicom_multivalued_rows()},
    "dicom codestream claims huge size": {"body": inputs.j2k_dicom_claiming(60_000, 60_000)},
    "deflated dicom bomb": {"body": inputs.deflated_dicom_bomb(300 << 20)},
    "multi-frame tiff": {"body": inputs.multipage_tiff(IMG8, 3)},
}


def _checked_4xx(r: requests.Response) -> dict:
    """A 4xx with strict JSON {code, error, message}; message and reason phrase short printable ASCII."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    return hostile.check_answer(hostile.Answer(r.status_code, r.content, r.reason or ""))


@pytest.mark.parametrize("case", sorted(DDSM_CASES))
def test_ddsm_bad_input(torchserve, case):
    kwargs = {k: v for k, v in DDSM_CASES[case].items() if v is not None}
    _checked_4xx(_post(torchserve, "ddsm", **kwargs))
    ok = _post(torchserve, "ddsm", body=PATCH)
    assert ok.status_code == 200, ok.text[:300]
    checked(ok, "response")


def test_messages_never_echo_the_input(torchserve):
    name = "MRN123_DOE_JANE_" + "x" * 44_000
    r = _post(torchserve, "ddsm", fields={"data": PATCH, name: "1", "explain": "MRN987_SMITH"})
    body = _checked_4xx(r)
    assert "MRN" not in r.text and "MRN" not in r.reason and len(r.content) < 1000, r.text[:300]
    assert body["error"] == "unknown_parameter"
    r = _post(torchserve, "ddsm", fields={"data": PATCH, "explain": "MRN987_SMITH"})
    assert _checked_4xx(r)["error"] == "unknown_method" and "MRN" not in r.text


def test_full_mammogram_occlusion_is_refused_before_the_work_naming_what_fits(torchserve, ddsm_data):
    full = _first_full_image(ddsm_data)
    r = _post(torchserve, "ddsm", fields={"data": full, "explain": "occlusion"})
    body = _checked_4xx(r)
    assert (r.status_code, body["error"]) == (413, "too_expensive") and "fits: occlusion_stride>=" in body["message"]
    stride = int(body["message"].split("occlusion_stride>=")[1].split()[0])
    ig = _post(torchserve, "ddsm", fields={"data": full, "explain": "integrated_gradients", "ig_steps": "128"})
    assert _checked_4xx(ig)["error"] == "too_expensive" and "ig_steps<=" in ig.json()["message"]
    assert stride > 1


def test_unit_maps_for_every_unit_are_refused_before_the_work(torchserve, ddsm_data, ddsm_bundle):
    from medxplain_models.bundle import ModelBundle

    units = ModelBundle.load(ddsm_bundle[0]).model.num_units
    every = {"top_k": str(units), "unit_maps": "true", "encoding": "float16"}
    r = _post(torchserve, "ddsm", fields={"data": PATCH, **every})  # cheap to compute, too big to answer
    body = _checked_4xx(r)
    assert (r.status_code, body["error"]) == (413, "response_too_large"), body
    assert "at most" in body["message"]
    r = _post(torchserve, "ddsm", fields={"data": _first_full_image(ddsm_data), **every})
    assert r.status_code == 413 and _checked_4xx(r)["error"] in ("too_expensive", "response_too_large")


def _first_full_image(ddsm_data) -> bytes:
    with open(ddsm_data / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (ddsm_data / row["path"]).read_bytes()


def _adni_cases(valid: bytes) -> dict:
    raw = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(valid))
    data, affine = np.asarray(raw.dataobj, np.float32), raw.affine
    nan = data.copy()
    nan[10, 10, 10] = np.nan
    far = affine.copy()
    far[:3, 3] += 5000.0  # a field of view nowhere near the template
    return {
        "empty body": {"body": b""},
        "png to mri": {"body": PATCH},
        "truncated nii.gz": {"body": valid[: len(valid) // 3]},
        "corrupt gzip": {"body": b"\x1f\x8b\x08\x00" + b"\xff" * 200},
        "not nifti": {"body": b"\x00" * 400},
        "2d nifti": {"body": inputs.nifti_bytes(np.zeros((20, 20), np.float32), np.eye(4))},
        "4d nifti": {"body": inputs.nifti_bytes(np.zeros((10, 10, 10, 2), np.float32), np.eye(4))},
        "nan voxels": {"body": inputs.nifti_bytes(nan, affine)},
        "not placeable": {"body": inputs.nifti_bytes(data, far)},
        "singular affine": {"body": inputs.nifti_singular_affine(data)},
        "gzip bomb": {"body": inputs.gzip_bomb(600 * 1024 * 1024)},
        "unknown method": {"fields": {"data": valid, "explain": "cam"}},
        "bad stride": {"fields": {"data": valid, "explain": "occlusion", "occlusion_stride": "0"}},
        "bad ig steps": {"fields": {"data": valid, "explain": "integrated_gradients", "ig_steps": "100000"}},
        "json bad base64": {"json_body": {"data": "@@@"}},
        "bool not bool": {"fields": {"data": valid, "unit_maps": "perhaps"}},
        "target unknown label": {"fields": {"data": valid, "target": "MCI"}},
        "top_k above units": {"fields": {"data": valid, "top_k": "65"}},
        "unknown parameter": {"fields": {"data": valid, "stride": "3"}},
        "explain endpoint, bad file": {"body": b"nonsense", "endpoint": "explanations"},
        "occlusion with a huge window": {"fields": {"data": valid, "explain": "occlusion", "occlusion_size": "256",
                                                    "occlusion_stride": "8"}},
        "oversized volume with unit maps": {"fields": {"data": _oversized_volume(), "unit_maps": "true",
                                                       "explain": "gradcam"}},
        "explain is a boolean": {"json_body": {"data": base64.b64encode(valid).decode(), "explain": True}},
        "non-utf8 grpc-style field": {"fields": {"data": valid, "top_k": b"\xc3\x28"}},
    }


def test_adni_bad_input(torchserve, adni_data):
    valid = _valid_volume(adni_data)
    cases = _adni_cases(valid)
    assert len(cases) >= 20
    failures = []
    for name, kwargs in cases.items():
        r = _post(torchserve, "adni", **kwargs)
        try:
            _checked_4xx(r)
        except AssertionError as err:
            failures.append((name, r.status_code, str(err)[:200]))
        ok = _post(torchserve, "adni", body=valid)
        if ok.status_code != 200:
            failures.append((f"valid after {name}", ok.status_code, ok.text[:200]))
        else:
            checked(ok, "response")
    assert not failures, failures


def _oversized_volume() -> bytes:
    """300^3 voxels at 0.65 mm over the template's field of view: unit maps on its grid cannot fit a response."""
    affine = np.diag([0.65, 0.65, 0.65, 1.0])
    affine[:3, 3] = [-97.5, -133.0, -80.0]
    return inputs.nifti_bytes(np.zeros((300, 300, 300), np.uint8), affine)


def test_adni_huge_occlusion_window_names_a_stride_that_fits(torchserve, adni_data):
    r = _post(torchserve, "adni", fields={"data": _valid_volume(adni_data), "explain": "occlusion",
                                          "occlusion_size": "256", "occlusion_stride": "8"})
    body = _checked_4xx(r)
    assert body["error"] == "too_expensive" and "occlusion_stride>=" in body["message"], body


def test_json_body_with_base64_is_accepted(torchserve):
    r = _post(torchserve, "ddsm", json_body={"data": base64.b64encode(PATCH).decode(), "top_k": 2})
    assert r.status_code == 200, r.text[:300]
    assert len(checked(r, "response")["units"]) == 2
