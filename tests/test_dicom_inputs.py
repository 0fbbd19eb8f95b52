"""DICOM inputs: an MRI series (zip / multipart/related) becomes the same volume as its NIfTI, and bad DICOM is a 4xx.

The series are written by ``model_store.synth.mri_dicom`` from the synthetic volumes (made-up patient
tags), decoded by ``medxplain_contract.decoding`` and checked against the NIfTI of the same volume and
against highdicom's own series reader. Engine-level tests use the session's trained ADNI/DDSM bundles;
one online test sends a series through the real TorchServe.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import UID

from medxplain_contract import decoding, multipart
from medxplain_contract.errors import InputError
from model_store.synth.mri import template_grid
from model_store.synth.mri_dicom import write_series
from tests import hostile, inputs

SEED = 5
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
MPEG2 = "1.2.840.10008.1.2.4.100"  # a registered transfer syntax no installed decoder reads


# ----------------------------------------------------------------------------- builders


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """The 3 mm template with texture, so every slice has many distinct values."""
    template, brain, affine = template_grid(3)
    rng = np.random.default_rng(SEED)
    return (template * rng.uniform(0.8, 1.2, template.shape) + 0.05 * brain).astype(np.float32), affine


def _edit(data: bytes, **changes) -> bytes:
    """A DICOM file with attributes changed by keyword (None deletes; file meta keywords go to the meta)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        target = ds.file_meta if keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID") else ds
        if value is None:
            delattr(target, keyword)
        else:
            setattr(target, keyword, value)
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax.is_transfer_syntax and syntax.is_compressed and "PixelData" in ds:  # native pixels as a bogus fragment
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True, force_encoding=True)
    return buf.getvalue()


def _zip(files: list[bytes], names: list[str] | None = None, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for i, data in enumerate(files):
            zf.writestr(names[i] if names else f"series/IM{i:04d}", data)
    return buf.getvalue()


def _related(files: list[bytes]) -> bytes:
    return multipart.encode_related(files)[0]


def _non_image(sop_class: str, modality: str) -> bytes:
    """A header-only DICOM object of a non-image SOP class (an SR, an RT plan), with patient tags."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[sop_class])
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = modality, "SYNTHETIC^NONIMAGE", "SYN-PID-NONIMAGE"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _shifted(data: bytes, offset_mm: float) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    position = [float(v) for v in ds.ImagePositionPatient]
    position[2] += offset_mm
    return _edit(data, ImagePositionPatient=position)


def _bomb_zip() -> bytes:
    """One member that declares (and inflates to) 600 MB of zeros: about 600 KB on the wire."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("series/IM0000", "w", force_zip64=True) as fh:
        chunk = b"\x00" * (1 << 20)
        for _ in range(600):
            fh.write(chunk)
    return buf.getvalue()


def _lying_zip(files: list[bytes]) -> bytes:
    """A zip whose directory declares a member smaller than it inflates to."""
    body = bytearray(_zip(files[:3]))
    central = body.rfind(b"PK\x01\x02")  # the last member's central directory entry
    body[central + 24:central + 28] = (100).to_bytes(4, "little")  # uncompressed size
    return bytes(body)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[list[bytes], np.ndarray, np.ndarray, list[Path]]:
    volume, affine = _volume()
    paths = write_series(volume, affine, tmp_path_factory.mktemp("series"), "S0042", SEED, subject_index=41)
    return [p.read_bytes() for p in paths], volume, affine, paths


def _slope(files: list[bytes]) -> float:
    return float(pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).RescaleSlope)


def _patient_values(files: list[bytes]) -> list[str]:
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    values = [str(ds[k].value) for k in PATIENT_TAGS]
    return values + [str(ds.PatientName).split("^")[-1]]


def _bad_series_cases(files: list[bytes]) -> dict[str, tuple[bytes, int, str]]:
    """name -> (body, expected status, expected code): every refusal of issue 14 section 5 for MRI."""
    n = len(files)
    huge = [_edit(f, Rows=20_000, Columns=20_000) for f in files]
    return {
        "sr sent alone": (_non_image(SR, "SR"), 415, "not_an_image"),
        "rt plan sent alone": (_non_image(RT_PLAN, "RTPLAN"), 415, "not_an_image"),
        "sr inside the series": (_zip(files[:10] + [_non_image(SR, "SR")]), 415, "not_an_image"),
        "missing slice": (_zip(files[: n // 2] + files[n // 2 + 1:]), 400, "incomplete_series"),
        "two missing slices": (_related(files[:10] + files[12:]), 400, "incomplete_series"),
        "one slice": (_zip(files[:1]), 400, "incomplete_series"),
        "two series": (_zip(files[:-1] + [_edit(files[-1], SeriesInstanceUID="1.2.3.4.5.6")]), 400, "mixed_series"),
        "two orientations": (_zip(files[:-1] + [_edit(files[-1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])]),
                             400, "mixed_series"),
        "two plane sizes": (_zip(files[:-1] + [_edit(files[-1], PixelSpacing=[3.5, 3.5])]), 400, "mixed_series"),
        "duplicate slice": (_zip(files + [files[5]]), 400, "irregular_series"),
        "uneven spacing": (_zip(files[:7] + [_shifted(files[7], 1.0)] + files[8:]), 400, "irregular_series"),
        "no geometry": (_zip([_edit(f, ImagePositionPatient=None) for f in files]), 400, "missing_geometry"),
        "multi-frame slice": (_zip(files[:-1] + [_edit(files[-1], NumberOfFrames=2)]), 400, "multiframe_unsupported"),
        "enhanced mr object": (_edit(files[0], SOPClassUID=ENHANCED_MR, MediaStorageSOPClassUID=ENHANCED_MR),
                               400, "multiframe_unsupported"),
        "enormous declared size": (_zip(huge), 413, "series_too_large"),
        "unknown transfer syntax": (_zip([_edit(files[0], TransferSyntaxUID="1.2.3.4")] + files[1:]), 415,
                                    "unsupported_transfer_syntax"),
        "undecodable transfer syntax": (_related([_edit(files[0], TransferSyntaxUID=MPEG2)] + files[1:]), 415,
                                        "unsupported_transfer_syntax"),
        "one dicom slice sent raw": (files[0], 415, "wrong_modality"),
        "zip bomb": (_bomb_zip(), 413, "series_too_large"),
        "zip declaring a wrong size": (_lying_zip(files), 400, "corrupt_zip"),
        "zip with too many members": (_zip([b"x"] * (decoding.MAX_SERIES_FILES + 1), compression=zipfile.ZIP_STORED),
                                      413, "series_too_large"),
        "zip path escaping": (_zip(files[:3], ["a/../../etc/IM0", "IM1", "IM2"]), 400, "bad_zip_member"),
        "zip absolute path": (_zip(files[:3], ["/tmp/IM0", "IM1", "IM2"]), 400, "bad_zip_member"),
        "zip duplicate names": (_zip(files[:3], ["IM0", "IM0", "IM2"]), 400, "bad_zip_member"),
        "zip bzip2 member": (_zip(files[:3], compression=zipfile.ZIP_BZIP2), 400, "bad_zip_member"),
        "zip with a text file": (_zip(files[:3] + [b"hello, not DICOM"]), 400, "not_dicom"),
        "truncated zip": (_zip(files[:3])[:-300], 400, "corrupt_zip"),
        "empty zip": (_zip([]), 400, "incomplete_series"),
        "multipart without closing boundary": (_related(files[:3])[:-40], 400, "bad_multipart"),
    }


# ----------------------------------------------------------------------------- the synthetic series


def test_written_series_is_a_realistic_deterministic_mr_series(series, tmp_path):
    files, volume, affine, paths = series
    assert len(files) == volume.shape[2]
    again = write_series(volume, affine, tmp_path, "S0042", SEED, subject_index=41)
    assert [p.read_bytes() for p in again] == files  # byte-identical: UIDs and times are hashed, not drawn
    headers = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    assert {h.SOPClassUID for h in headers} == {pydicom.uid.MRImageStorage}
    assert len({h.SeriesInstanceUID for h in headers}) == len({h.FrameOfReferenceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == len(files)
    assert str(headers[0].PatientName).startswith("SYNTHETIC^") and headers[0].PatientID.startswith("SYN-PID-")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    for k in (0, len(files) - 1):
        assert np.allclose([float(v) for v in headers[k].ImagePositionPatient], lps[:3, :3] @ [0, 0, k] + lps[:3, 3])
        assert (headers[k].Rows, headers[k].Columns) == (volume.shape[1], volume.shape[0])
    other = write_series(volume, affine, tmp_path / "other", "S0043", SEED)
    assert pydicom.dcmread(other[0]).SeriesInstanceUID != headers[0].SeriesInstanceUID
    if shutil.which("dciodvfy"):  # dicom3tools (make setup installs it for the PACS tests)
        out = subprocess.run(["dciodvfy", str(paths[3])], check=False, capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


# ----------------------------------------------------------------------------- series -> volume


@pytest.mark.parametrize("packing", ["zip in slice order", "zip shuffled", "multipart shuffled", "zip of a folder"])
def test_series_decodes_to_the_nifti_volume(series, packing):
    files, volume, affine, _ = series
    order = np.random.default_rng(1).permutation(len(files)) if "shuffled" in packing else np.arange(len(files))
    sent = [files[i] for i in order]
    if packing == "zip of a folder":  # what an archiver makes of an exported series folder
        body = _zip(sent + [b"", b"\x00"], [f"export/S0042/slice-{i:04d}.dcm" for i in order] +
                    ["export/S0042/DICOMDIR", "__MACOSX/export/._slice-0000.dcm"])
    else:
        body = _related(sent) if packing.startswith("multipart") else _zip(sent)
    decoded = decoding.decode_volume(body)
    nifti = decoding.decode_volume(inputs.nifti_bytes(volume, affine))
    assert decoded.data.shape == nifti.data.shape == volume.shape and decoded.data.dtype == np.float32
    assert np.abs(decoded.data - nifti.data).max() <= _slope(files) / 2 + 1e-7  # within the 16-bit quantisation
    assert np.allclose(decoded.affine, nifti.affine, atol=1e-6)
    source = decoded.source
    assert source is not None and source.is_volume and source.display is decoded.data
    assert [int(ds.InstanceNumber) for ds in source.datasets] == list(range(1, len(files) + 1))  # slice k = data[:, :, k]
    assert all("PixelData" not in ds for ds in source.datasets)
    assert str(source.datasets[0].PatientName) == str(pydicom.dcmread(io.BytesIO(files[0])).PatientName)
    frames = source.to_frames(decoded.data)
    k = 17
    assert np.array_equal(frames[k], pydicom.pixels.apply_modality_lut(
        pydicom.dcmread(io.BytesIO(files[k])).pixel_array, pydicom.dcmread(io.BytesIO(files[k]))).astype(np.float32))


def test_series_geometry_agrees_with_highdicom(series):
    """An independent reader (highdicom's get_volume_from_series) places every voxel at the same point."""
    files, _, _, _ = series
    decoded = decoding.decode_volume(_zip(files))
    theirs = highdicom.get_volume_from_series([pydicom.dcmread(io.BytesIO(f)) for f in files])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ theirs.affine  # highdicom: LPS, array (slice, row, column)
    ours_c = nib.as_closest_canonical(nib.Nifti1Image(decoded.data, decoded.affine))
    theirs_c = nib.as_closest_canonical(nib.Nifti1Image(theirs.array.astype(np.float32), ras))
    assert np.allclose(ours_c.affine, theirs_c.affine, atol=1e-6)
    assert np.allclose(np.asarray(ours_c.dataobj), np.asarray(theirs_c.dataobj), atol=1e-6)


@pytest.mark.parametrize("grid", ["oblique anisotropic", "left-handed (LAS)"])
def test_other_grids_keep_their_world_coordinates(tmp_path, grid):
    """A rotated anisotropic grid comes back with its own affine; a left-handed one is restacked along the
    slice normal (k reversed), so voxels keep their world positions."""
    rng = np.random.default_rng(2)
    data = rng.uniform(0, 1000, (20, 24, 12)).astype(np.float32)
    if grid.startswith("oblique"):
        angle = np.deg2rad(20)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
        affine[:3, 3] = [-10.25, 20.5, -30.75]
    else:
        affine = np.diag([-1.5, 1.5, 3.0, 1.0])
        affine[:3, 3] = [14.25, -17.25, -15.0]
    paths = write_series(data, affine, tmp_path, "S9999", SEED)
    decoded = decoding.decode_volume(_zip([p.read_bytes() for p in paths]))
    slope = _slope([paths[0].read_bytes()])
    ours = nib.as_closest_canonical(nib.Nifti1Image(decoded.data, decoded.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert np.allclose(ours.affine, truth.affine, atol=1e-4)
    assert np.abs(np.asarray(ours.dataobj) - np.asarray(truth.dataobj)).max() <= slope / 2 + 1e-3
    if grid.startswith("oblique"):
        assert np.allclose(decoded.affine, affine, atol=1e-4)  # right-handed grids keep their own index order


# ----------------------------------------------------------------------------- mammogram DICOM keeps its header


def test_mammogram_dicom_keeps_its_header_without_pixels():
    pixels = (np.random.default_rng(0).random((300, 260)) * 4000).astype(np.uint16)
    image = decoding.decode_image(inputs.dicom_bytes(pixels, patient_name="SYNTHETIC^KEPT", patient_id="SYN-PID-7"))
    assert image.source is not None and not image.source.is_volume
    (ds,) = image.source.datasets
    assert str(ds.PatientName) == "SYNTHETIC^KEPT" and ds.PatientID == "SYN-PID-7" and "PixelData" not in ds
    assert image.source.display is image.pixels
    assert np.array_equal(image.source.to_frames(image.pixels)[0], image.pixels)
    png = decoding.decode_image(inputs.png_bytes((pixels >> 4).astype(np.uint8)))
    assert png.source is None


def _mammo_cases() -> dict[str, tuple[bytes, int, str]]:
    pixels = (np.random.default_rng(0).random((300, 260)) * 4000).astype(np.uint16)
    valid = inputs.dicom_bytes(pixels)
    tomo = "1.2.840.10008.5.1.4.1.1.13.1.3"  # Breast Tomosynthesis Image Storage: multi-frame
    return {
        "sr to the mammography model": (_non_image(SR, "SR"), 415, "not_an_image"),
        "rt plan to the mammography model": (_non_image(RT_PLAN, "RTPLAN"), 415, "not_an_image"),
        "sr class claimed by a file with pixels": (_edit(valid, SOPClassUID=SR), 415, "not_an_image"),
        "three frames": (_edit(valid, NumberOfFrames=3), 400, "multiframe_unsupported"),
        "tomosynthesis object": (_edit(valid, SOPClassUID=tomo, MediaStorageSOPClassUID=tomo), 400,
                                 "multiframe_unsupported"),
        "unknown transfer syntax": (_edit(valid, TransferSyntaxUID="1.2.3.4"), 415, "unsupported_transfer_syntax"),
        "undecodable transfer syntax": (_edit(valid, TransferSyntaxUID=MPEG2), 415, "unsupported_transfer_syntax"),
        "enormous declared size": (_edit(valid, Rows=60_000, Columns=60_000), 413, "image_too_large"),
        "series zip to the mammography model": (_zip([valid, valid]), 415, "unknown_format"),
    }


@pytest.mark.parametrize("case", sorted(_mammo_cases()))
def test_bad_mammogram_dicom_is_refused_with_its_code(case):
    body, status, code = _mammo_cases()[case]
    with pytest.raises(InputError) as err:
        decoding.decode_image(body)
    assert (err.value.status, err.value.code) == (status, code), err.value.message
    assert "SYNTHETIC" not in err.value.message and "1.2.3.4" not in err.value.message


def test_bad_series_are_refused_with_their_code(series):
    """Contract level (torch-free): every case, its status and code, a short message without patient data."""
    files, *_ = series
    secrets = _patient_values(files)
    wrong = {}
    for name, (body, status, code) in _bad_series_cases(files).items():
        try:
            decoding.decode_volume(body)
            wrong[name] = "accepted"
        except InputError as err:
            if (err.status, err.code) != (status, code):
                wrong[name] = (err.status, err.code, err.message)
            assert len(err.message) <= 200 and err.message.isascii() and not any(s in err.message for s in secrets)
    assert not wrong, wrong


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def adni_engine(adni_bundle):
    from medxplain_engine.engine import Engine

    return Engine.from_model_dir(adni_bundle[0])


@pytest.fixture(scope="module")
def ddsm_engine(ddsm_bundle):
    from medxplain_engine.engine import Engine

    return Engine.from_model_dir(ddsm_bundle[0])


def _subject_series(adni_data: Path) -> tuple[list[bytes], dict]:
    with open(adni_data / "subjects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if r["dicom_path"])
    return [p.read_bytes() for p in sorted((adni_data / row["dicom_path"]).glob("*.dcm"))], row


def test_engine_prediction_for_a_series_equals_its_nifti(adni_engine, adni_data, caplog):
    from medxplain_engine.engine import EngineRequest

    files, row = _subject_series(adni_data)
    decoded = decoding.decode_volume(_zip(files))
    nifti = inputs.nifti_bytes(decoded.data, decoded.affine)
    original = nib.load(adni_data / row["path"])
    assert np.abs(decoded.data - np.asarray(original.dataobj)).max() <= _slope(files) / 2 + 1e-7
    assert np.allclose(decoded.affine, original.affine, atol=1e-6)
    params = {"explain": "gradcam", "top_k": 3}
    with caplog.at_level(logging.DEBUG):
        by_zip, by_related, by_nifti = adni_engine.run([EngineRequest(_zip(files[::-1]), params),
                                                        EngineRequest(_related(files), params),
                                                        EngineRequest(nifti, params)])
    for response in (by_zip, by_related, by_nifti):
        assert not isinstance(response, InputError), response
    for response in (by_zip, by_related):
        for key, p in by_nifti["prediction"]["probabilities"].items():
            assert abs(response["prediction"]["probabilities"][key] - p) <= 1e-5
        assert response["prediction"]["label"] == by_nifti["prediction"]["label"]
        assert [u["unit"] for u in response["units"]] == [u["unit"] for u in by_nifti["units"]]
        assert response["input"]["geometry"] == by_nifti["input"]["geometry"]
        ours, theirs = (json.loads(json.dumps(r["heatmaps"])) for r in (response, by_nifti))
        assert ours == theirs  # the same maps, on the same sent grid
    text = json.dumps([by_zip, by_related]) + caplog.text
    for secret in _patient_values(files):
        assert secret not in text, "a patient identifier reached a response or the log"


def test_engine_answers_every_bad_series_with_its_4xx(adni_engine, series, caplog):
    from medxplain_engine.engine import EngineRequest

    files, *_ = series
    cases = _bad_series_cases(files)
    with caplog.at_level(logging.DEBUG):
        answers = [adni_engine.prepare_isolated(EngineRequest(body, {})) for body, _, _ in cases.values()]
    got = {name: (a.status, a.code) if isinstance(a, InputError) else "accepted" for name, a in zip(cases, answers)}
    assert got == {name: (status, code) for name, (_, status, code) in cases.items()}
    for secret in _patient_values(files) + ["SYNTHETIC^NONIMAGE"]:
        assert secret not in caplog.text and not any(secret in a.message for a in answers)


def test_engine_answers_bad_mammogram_dicom_with_its_4xx(ddsm_engine):
    from medxplain_engine.engine import EngineRequest

    cases = _mammo_cases()
    answers = [ddsm_engine.prepare_isolated(EngineRequest(body, {})) for body, _, _ in cases.values()]
    got = {name: (a.status, a.code) if isinstance(a, InputError) else "accepted" for name, a in zip(cases, answers)}
    assert got == {name: (status, code) for name, (_, status, code) in cases.items()}


def test_served_model_takes_a_series_as_zip_and_as_multipart(torchserve, adni_data):
    """Through the real TorchServe: the raw body reaches the handler intact, and the answer equals the NIfTI's."""
    files, _ = _subject_series(adni_data)
    decoded = decoding.decode_volume(_zip(files))
    url = f"{torchserve.inference_url}/predictions/adni"
    headers = torchserve.auth_header()
    answers = {}
    for name, body, content_type in (
            ("nifti", inputs.nifti_bytes(decoded.data, decoded.affine), "application/octet-stream"),
            ("zip", _zip(files), "application/zip"),
            ("multipart", *multipart.encode_related(files))):
        r = requests.post(url, data=body, headers={**headers, "Content-Type": content_type}, timeout=300)
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        answers[name] = r.json()
    for name in ("zip", "multipart"):
        for key, p in answers["nifti"]["prediction"]["probabilities"].items():
            assert abs(answers[name]["prediction"]["probabilities"][key] - p) <= 1e-5
    bad = requests.post(url, data=_zip(files[:20] + files[21:]), headers=headers, timeout=300)
    assert bad.status_code == 400 and bad.json()["error"] == "incomplete_series"
    logs = "".join(p.read_text(errors="replace") for p in (torchserve.workdir / "logs").glob("*"))
    text = json.dumps(answers) + bad.text
    for secret in _patient_values(files):
        assert secret not in text and secret not in logs


# ----------------------------------------------------------------------------- garbage never crashes


def _small_series() -> list[bytes]:
    import tempfile

    data = np.random.default_rng(3).uniform(0, 100, (16, 12, 6)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        return [p.read_bytes() for p in write_series(data, np.diag([2.0, 2.0, 3.0, 1.0]), Path(tmp), "S0001", 1)]


SMALL = _small_series()
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _refused_cleanly(body: bytes) -> None:
    """A volume, or an InputError with a 4xx and a short ASCII message; anything else fails the test."""
    try:
        volume = decoding.decode_volume(body)
    except InputError as err:
        assert 400 <= err.status < 500, (err.status, err.code)
        assert err.message.isascii() and len(err.message) <= 200 and "SYNTHETIC" not in err.message
        return
    assert volume.data.ndim == 3 and np.isfinite(volume.data).all()
    assert np.isfinite(volume.affine).all()


@FUZZ
@given(body=st.one_of(
    st.sampled_from([_zip(SMALL), _related(SMALL), _zip(SMALL, compression=zipfile.ZIP_STORED)]).flatmap(
        hostile.byte_mutations),
    st.binary(max_size=400).map(lambda b: b"PK\x03\x04" + b),
    st.binary(max_size=400).map(lambda b: b"--medxplain-x\r\n" + b),
    hostile.series_bodies(SMALL),
))
def test_series_decoders_never_crash_on_garbage(body):
    _refused_cleanly(body)


def test_uid_names_in_messages_come_from_the_dictionary():
    """Messages name SOP classes and transfer syntaxes from pydicom's registry, never the raw UID sent."""
    from medxplain_contract import dicom

    assert dicom.sop_class_name(SR) == UID(SR).name
    assert dicom.sop_class_name("1.2.3.999.SYN-PID-1") == "an unregistered SOP class"
    assert dicom.transfer_syntax_name_of("9.9.SYNTHETIC") == "an unknown transfer syntax"


def test_pydicom_warnings_quoting_raw_values_never_reach_logs_or_warnings(series, caplog, recwarn):
    """pydicom warns "Invalid value for VR UI: '<the value>'" to its logger and to warnings; values can be PHI."""
    files, *_ = series
    canary = "SYNTHETIC^LEAK-CANARY-" + "9" * 60
    with pytest.warns(UserWarning):  # writing it warns here, in the test: the value is invalid for its VR
        bad = _edit(files[-1], SeriesInstanceUID=canary, PatientName=canary * 3)
    body = _zip(files[:-1] + [bad])
    recwarn.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(InputError) as err:
        decoding.decode_volume(body)
    assert err.value.code == "mixed_series"
    assert "CANARY" not in caplog.text and "CANARY" not in err.value.message
    assert not [w for w in recwarn if "CANARY" in str(w.message)]
