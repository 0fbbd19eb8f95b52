"""DICOM in and out over REST, against the session's real TorchServe.

``output=dicom`` (or the STOW-like ``Accept`` header) answers a DICOM mammogram or an MRI series with
``multipart/related; type="application/dicom"``: an SR, a Parametric Map and an RGB overlay per method,
each valid for dciodvfy, equal to the JSON answer for the same request, attached to the source study;
patient identity stays out of the JSON and the server log. An MRI series sent as a zip or as a
multipart/related body is predicted like the NIfTI of the same volume.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ParametricMapStorage, SecondaryCaptureImageStorage

from medxplain_client import ClientError
from medxplain_client.__main__ import series_zip
from medxplain_contract.encodings import decode_map
from medxplain_contract.multipart import boundary_of, decode_related, encode_related
from tests import dicom_validate
from tests.schema_check import checked
from tests.test_dicom_outputs import numbers, pm_frames, sr_groups

IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber")
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}  # Comprehensive 3D SR, Comprehensive SR


@pytest.fixture(scope="module")
def mammogram(ddsm_data) -> Path:
    return min((ddsm_data / "dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def mri_series(adni_data) -> tuple[Path, Path]:
    """(series folder, NIfTI of the same volume) of the first subject the generator wrote as DICOM."""
    with open(adni_data / "subjects.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["dicom_path"])
    return adni_data / row["dicom_path"], adni_data / row["path"]


def _objects(parts: list[bytes]) -> list[Dataset]:
    return [dcmread(io.BytesIO(part)) for part in parts]


def _by_class(objects: list[Dataset]) -> dict[str, list[Dataset]]:
    kinds: dict[str, list[Dataset]] = {"sr": [], "pm": [], "sc": []}
    for ds in objects:
        uid = str(ds.SOPClassUID)
        kinds["sr" if uid in SR_CLASSES else "pm" if uid == ParametricMapStorage
              else "sc" if uid == SecondaryCaptureImageStorage else uid].append(ds)
    return kinds


def _check_objects(objects: list[Dataset], sources: list[Dataset], answer: dict, methods: list[str]) -> None:
    """What every output=dicom answer must hold, whatever the model."""
    kinds = _by_class(objects)
    assert [len(kinds[k]) for k in ("sr", "pm", "sc")] == [1, len(methods), len(methods)], list(kinds)
    for ds in objects:
        assert dicom_validate.errors(ds) == [], ds.SOPClassUID
        for keyword in IDENTITY:  # attached to the source study
            if keyword in sources[0]:
                assert ds.get(keyword) == sources[0].get(keyword), keyword
        assert ds.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
        assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    sr = kinds["sr"][0]
    assert sr.VerificationFlag == "UNVERIFIED"
    found = numbers(sr_groups(sr)["prediction"])
    for name, p in answer["prediction"]["probabilities"].items():
        assert found[f"Probability of {name}"] == pytest.approx(p, rel=1e-6, abs=1e-12)
    source_uids = [s.SOPInstanceUID for s in sources]
    for method, pm in zip(methods, kinds["pm"], strict=True):
        values, refs = pm_frames(pm)
        assert sorted(refs) == sorted(source_uids)  # one frame per source image (highdicom orders the frames)
        want = decode_map(answer["heatmaps"][method])  # the JSON's map on the sent grid
        frames = want[None] if want.ndim == 2 else np.transpose(want, (2, 1, 0))
        frames = frames[[source_uids.index(ref) for ref in refs]]  # the JSON's slice each frame says it came from
        tolerance = 2e-3 * float(np.abs(frames).max()) + 1e-6  # float16 (JSON) vs float32 (DICOM); nifti.gz is 8-bit
        if answer["heatmaps"][method]["encoding"] == "nifti.gz":
            tolerance = (float(frames.max()) - float(frames.min())) / 254 + 1e-6
        assert values.shape == frames.shape
        assert float(np.abs(values - frames).max()) <= tolerance, method


def test_ddsm_output_dicom_equals_the_json_answer(torchserve_client, mammogram, torchserve):
    answer = checked(torchserve_client.predict("ddsm", mammogram, explain="cam,gradcam", top_k=3, encoding="float16"),
                     "response")
    objects = _objects(torchserve_client.dicom("ddsm", mammogram, methods="cam,gradcam", top_k=3))
    source = dcmread(mammogram, stop_before_pixels=True)
    _check_objects(objects, [source], answer, ["cam", "gradcam"])
    units = sr_groups(_by_class(objects)["sr"][0])
    for unit in answer["units"]:
        assert numbers(units[f"unit {unit['unit']}"])["Unit contribution"] == pytest.approx(unit["contribution"],
                                                                                            rel=1e-6)
    text = json.dumps(answer) + torchserve.log_path.read_text(errors="replace")
    for keyword in ("PatientID", "PatientName", "AccessionNumber"):
        assert str(source.get(keyword)) not in text, keyword  # identity never in the JSON nor in the log


def test_accept_header_asks_for_dicom_too(torchserve, mammogram):
    headers = {**torchserve.auth_header(), "Accept": 'multipart/related; type="application/dicom"'}
    r = requests.post(f"{torchserve.inference_url}/predictions/ddsm", headers=headers, timeout=300,
                      files={"data": ("x.dcm", mammogram.read_bytes())}, data={"top_k": "2"})
    assert r.status_code == 200, r.text[:200]
    boundary = boundary_of(r.headers["Content-Type"])
    assert boundary and r.headers["Content-Type"].startswith("multipart/related")
    kinds = _by_class(_objects(decode_related(r.content, boundary)))
    assert [len(kinds[k]) for k in ("sr", "pm", "sc")] == [1, 0, 0]  # no heatmap asked: the SR alone


@pytest.mark.parametrize(("params", "error"), [
    ({"output": "dicom", "unit_maps": "true"}, "bad_parameter"),
    ({"output": "dcm"}, "bad_parameter"),
])
def test_bad_dicom_output_requests_are_400s(torchserve_client, mammogram, params, error):
    with pytest.raises(ClientError) as caught:
        torchserve_client.predict("ddsm", mammogram, **params)
    assert (caught.value.status, caught.value.error) == (400, error)


def test_output_dicom_of_a_png_is_refused(torchserve_client, ddsm_data):
    png = min((ddsm_data / "images").glob("*.png"))
    with pytest.raises(ClientError) as caught:
        torchserve_client.dicom("ddsm", png, methods="cam")
    assert (caught.value.status, caught.value.error) == (400, "dicom_output_needs_dicom_input")


def test_mri_series_predicts_like_its_nifti_as_zip_and_multipart(torchserve_client, torchserve, mri_series):
    folder, nifti = mri_series
    from_nifti = checked(torchserve_client.predict("adni", nifti, top_k=3), "response")
    from_zip = checked(torchserve_client.predict("adni", series_zip(folder), top_k=3), "response")
    files = [p.read_bytes() for p in sorted(folder.iterdir())]
    body, content_type = encode_related(files)
    r = requests.post(f"{torchserve.inference_url}/predictions/adni", data=body, timeout=300,
                      headers={**torchserve.auth_header(), "Content-Type": content_type})
    assert r.status_code == 200, r.text[:200]
    from_multipart = checked(r.json(), "response")
    assert from_zip["input"]["format"] == from_multipart["input"]["format"] == "dicom"
    assert from_zip["input"]["geometry"]["shape"] == from_nifti["input"]["geometry"]["shape"]
    np.testing.assert_allclose(from_zip["input"]["geometry"]["affine"], from_nifti["input"]["geometry"]["affine"],
                               atol=1e-4)
    for other in (from_zip, from_multipart):
        for name, p in from_nifti["prediction"]["probabilities"].items():
            assert other["prediction"]["probabilities"][name] == pytest.approx(p, abs=1e-3)  # 16-bit slices


def test_mri_series_output_dicom(torchserve_client, mri_series):
    folder, _ = mri_series
    payload = series_zip(folder)
    answer = checked(torchserve_client.predict("adni", payload, explain="gradcam", top_k=3), "response")
    objects = _objects(torchserve_client.dicom("adni", payload, methods="gradcam", top_k=3))
    sources = sorted((dcmread(p, stop_before_pixels=True) for p in folder.iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    sr = _by_class(objects)["sr"][0]
    assert any(name.startswith("gradcam region") for name in sr_groups(sr))
    _check_objects(objects, _slice_order(sources, answer), answer, ["gradcam"])


def _slice_order(sources: list[Dataset], answer: dict) -> list[Dataset]:
    """The source slices in stack order: by position along the slice normal, row x column direction (PS3.3
    C.7.6.2), the order the sent grid's k axis follows (docs/api.md, "MRI as a DICOM series")."""
    iop = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(sources, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))


def test_cli_output_dicom_stores_the_objects_in_the_pacs(torchserve, orthanc_server, mammogram, tmp_path,
                                                          monkeypatch, capsys):
    """``explain --output dicom --stow URL``: files written, every object in the PACS under the source study."""
    from medxplain_client.__main__ import main as cli
    from medxplain_contract import dicomweb

    env = orthanc_server.write_env_file(tmp_path / "orthanc.env")
    monkeypatch.setenv("MEDXAI_DICOMWEB_ENV_FILE", str(env))
    pacs = dicomweb.connect(orthanc_server.dicomweb_url, dicomweb.DicomwebConfig(*orthanc_server.auth))
    study = str(dcmread(mammogram, stop_before_pixels=True).StudyInstanceUID)
    before = pacs.count_instances(study)
    args = ["explain", "--model", "ddsm", "--input", str(mammogram), "--explain", "cam", "--output", "dicom",
            "--stow", orthanc_server.dicomweb_url, "--url", torchserve.inference_url,
            "--token-file", str(torchserve.key_file), "--out", str(tmp_path / "out")]
    assert cli(args) == 0
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert [p.name.rsplit("-", 1)[1] for p in written] == ["sr.dcm", "pm.dcm", "sc.dcm"]
    assert pacs.count_instances(study) == before + 3
    assert cli(args) == 0  # the same input, archive and options: the same UIDs, nothing stored twice
    assert pacs.count_instances(study) == before + 3
    password = orthanc_server.auth[1]
    env.write_text(env.read_text().replace(password, "not-the-password"))
    capsys.readouterr()
    assert cli(args) == 2  # a refused password: one line, before the inference
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not-the-password" not in err[0] and password not in err[0]
