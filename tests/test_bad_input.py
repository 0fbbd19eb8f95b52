"""Every malformed request gets a 4xx with a message, and the worker answers the next valid one."""

from __future__ import annotations

import base64
import csv

import nibabel as nib
import numpy as np
import pytest
import requests

from tests import inputs

RNG = np.random.default_rng(3)
IMG8 = (RNG.random((300, 260)) * 255).astype(np.uint8)
PATCH = inputs.patch_png()


def _post(server, model: str, *, body: bytes | None = None, fields: dict | None = None, json_body=None,
          endpoint: str = "predictions") -> requests.Response:
    url = f"{server.inference_url}/{endpoint}/{model}"
    headers = server.auth_header()
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
}


@pytest.mark.parametrize("case", sorted(DDSM_CASES))
def test_ddsm_bad_input(torchserve, case):
    r = _post(torchserve, "ddsm", **DDSM_CASES[case])
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    body = r.json()
    assert body.get("message"), body
    ok = _post(torchserve, "ddsm", body=PATCH)
    assert ok.status_code == 200, ok.text[:300]


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
    }


def test_adni_bad_input(torchserve, adni_data):
    valid = _valid_volume(adni_data)
    cases = _adni_cases(valid)
    assert len(cases) >= 20
    failures = []
    for name, kwargs in cases.items():
        r = _post(torchserve, "adni", **kwargs)
        if not (400 <= r.status_code < 500 and r.json().get("message")):
            failures.append((name, r.status_code, r.text[:200]))
        ok = _post(torchserve, "adni", body=valid)
        if ok.status_code != 200:
            failures.append((f"valid after {name}", ok.status_code, ok.text[:200]))
    assert not failures, failures


def test_json_body_with_base64_is_accepted(torchserve):
    r = _post(torchserve, "ddsm", json_body={"data": base64.b64encode(PATCH).decode(), "top_k": 2})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["units"]) == 2
