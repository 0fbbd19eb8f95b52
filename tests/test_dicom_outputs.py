"""DICOM outputs (medxplain_dicom): SR, Parametric Maps and RGB overlays of one result, built from real sources.

Sources are real files: a synthetic mammogram written by model_store/synth/mammo.py's DICOM writer
and an MRI series (model_store/synth/mri_dicom.py when present, else an equivalent MR Image Storage
series written here with pydicom). Responses and maps are composed by hand to docs/api.md's schema,
so no model is needed; every object is checked by dciodvfy and read back field by field.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medxplain_contract.dicom_source import DicomSource
from medxplain_contract.errors import UnprocessableInput
from medxplain_dicom import codes
from medxplain_dicom.render import Algorithm, render_objects
from model_store.synth.mammo import write_dicom
from tests import dicom_validate

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber",
            "StudyID", "StudyDate")
ALGORITHM = Algorithm("ddsm", "1.0", "0123456789abcdef" * 4, "0.1.0")


# --- sources --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mammo(tmp_path_factory: pytest.TempPathFactory) -> DicomSource:
    path = tmp_path_factory.mktemp("mammo") / "m.dcm"
    rng = np.random.default_rng(3)
    image = (rng.random((160, 104)) * 60000).astype(np.uint16)
    write_dicom(path, image, "C0001_LEFT_CC", 0, "LEFT", "CC", seed=7)
    ds = pydicom.dcmread(path)
    return DicomSource([ds], ds.pixel_array.astype(np.float32) / 65535.0)


def _mr_series(volume: np.ndarray, affine: np.ndarray, out: Path) -> list[Path]:
    """An MR Image Storage series of ``volume`` (i, j, k), slice k = file k, as synth/mri_dicom writes it."""
    try:
        from model_store.synth.mri_dicom import write_series
    except ImportError:  # branch h/dicom-in not merged yet: the same layout, written here
        pass
    else:
        return write_series(volume, affine, out, "SUBJ-1", seed=5)
    out.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    study, series, frame = (generate_uid(entropy_srcs=["mr-test", x]) for x in ("study", "series", "for"))
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["mr-test", "sop", str(k)])
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^MR", "SYN-PID-MR1", "19400101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "090000", "SYN-ACC-MR1", "MR1"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "MR", 1, k + 1
        ds.BodyPartExamined = "BRAIN"
        ds.ImageType, ds.ScanningSequence, ds.SequenceVariant = ["ORIGINAL", "PRIMARY"], "GR", "SP"
        ds.ScanOptions, ds.MRAcquisitionType, ds.EchoTrainLength, ds.PositionReferenceIndicator = "", "3D", 1, ""
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1])]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray((volume[:, :, k].T * 1000).astype("<u2")).tobytes()
        paths.append(out / f"slice-{k:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def mri(tmp_path_factory: pytest.TempPathFactory) -> DicomSource:
    rng = np.random.default_rng(4)
    volume = rng.random((12, 14, 6)).astype(np.float32)
    turn = np.deg2rad(10.0)  # an oblique series: the map must follow the slices' own orientation
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 2.5])
    affine[:3, 3] = [-9.0, -14.0, -7.5]
    paths = _mr_series(volume, affine, tmp_path_factory.mktemp("mri"))
    return DicomSource([pydicom.dcmread(p) for p in paths], volume)


# --- responses and maps (docs/api.md's schema, composed by hand) ------------------------------------

def mammo_response() -> dict:
    return {
        "api_version": "1", "model": {"name": "ddsm", "version": "1.0", "archive_digest": ALGORITHM.archive_digest},
        "prediction": {"label": "malignant", "label_index": 2,
                       "probabilities": {"normal": 0.125, "benign": 0.3046875, "malignant": 0.5703125},
                       "decision": {"label_index": 2, "rule": "per_class_thresholds", "lesion_score": 0.57,
                                    "threshold": 0.31}},
        "units": [{"unit": 12, "rank": 1, "activation": 3.25, "weight": 0.02, "contribution": 0.065,
                   "weight_source": "classifier", "labels": ["mass margin: spiculated", "mass shape: irregular"]},
                  {"unit": 40, "rank": 2, "activation": 1.5, "weight": 0.01, "contribution": 0.015,
                   "weight_source": "classifier", "labels": [], "concepts": ["calc.suspicious.fine_pleomorphic"]},
                  {"unit": 3, "rank": 3, "activation": None, "weight": 0.01, "contribution": None,
                   "weight_source": "classifier", "labels": ["a free-text note"]}],
    }


def mri_response() -> dict:
    return {
        "api_version": "1", "model": {"name": "adni", "version": "1.0"},
        "prediction": {"label": "AD", "label_index": 1, "probabilities": {"CN": 0.25, "AD": 0.75}},
        "units": [{"unit": 5, "rank": 1, "activation": 0.8, "weight": 0.4, "contribution": 0.32,
                   "weight_source": "gradcam", "labels": []}],
        "regions": {"gradcam": [
            {"index": 37, "name": "Hippocampus_L", "hemisphere": "L", "voxels": 40, "sum": 4.5, "per_voxel": 0.1125,
             "rank": 1},
            {"index": 38, "name": "Hippocampus_R", "hemisphere": "R", "voxels": 38, "sum": 3.0, "per_voxel": 0.0789,
             "rank": 2}]},
    }


def maps_for(source: DicomSource, methods: tuple[str, ...], peak_slice: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(methods))
    out = {}
    for m in methods:
        grid = (rng.standard_normal(source.display.shape) * 0.3).astype(np.float32)
        if peak_slice is not None:
            grid[3, 4, peak_slice] = 5.0  # the overlay must capture this slice
        out[m] = grid
    return out


@pytest.fixture(scope="module")
def mammo_objects(mammo: DicomSource) -> tuple[list[Dataset], dict[str, np.ndarray]]:
    maps = maps_for(mammo, ("cam", "gradcam"))
    return render_objects(mammo_response(), mammo, maps, ALGORITHM, "req-1"), maps


@pytest.fixture(scope="module")
def mri_objects(mri: DicomSource) -> tuple[list[Dataset], dict[str, np.ndarray]]:
    maps = maps_for(mri, ("gradcam",), peak_slice=4)
    adni = Algorithm("adni", "1.0", "fedcba9876543210" * 4, "0.1.0")
    return render_objects(mri_response(), mri, maps, adni, "req-1"), maps


# --- helpers that read the objects back ---------------------------------------------------------------

def content_items(seq, path=()):
    """Every SR content item (depth first) with the concept names of its ancestors."""
    for item in seq:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        yield path, name, item
        if "ContentSequence" in item:
            yield from content_items(item.ContentSequence, (*path, name))


def sr_groups(sr: Dataset) -> dict[str, list[Dataset]]:
    """Tracking identifier -> the group's child items."""
    out = {}
    for _, name, item in content_items(sr.ContentSequence):
        if name == "Measurement Group":
            ident = next(c.TextValue for c in item.ContentSequence
                         if c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier")
            out[ident] = list(item.ContentSequence)
    return out


def numbers(group: list[Dataset]) -> dict[str, float]:
    return {c.ConceptNameCodeSequence[0].CodeMeaning: float(c.MeasuredValueSequence[0].FloatingPointValue
                                                            if "FloatingPointValue" in c.MeasuredValueSequence[0]
                                                            else c.MeasuredValueSequence[0].NumericValue)
            for c in group if c.ValueType == "NUM"}


def coded(group: list[Dataset]) -> list[tuple[str, str, str]]:
    """The group's coded evaluations (its finding type, concept name "Finding", left out)."""
    return [(c.ConceptNameCodeSequence[0].CodeMeaning, c.ConceptCodeSequence[0].CodingSchemeDesignator,
             c.ConceptCodeSequence[0].CodeValue) for c in group
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeMeaning != "Finding"]


def pm_frames(pm: Dataset) -> tuple[np.ndarray, list[str]]:
    """Float frames of a parametric map and the source SOP Instance UID each frame was derived from."""
    values = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(int(pm.NumberOfFrames), pm.Rows, pm.Columns)
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in pm.PerFrameFunctionalGroupsSequence]
    return values, refs


def roundtrip(ds: Dataset, tmp_path: Path, name: str) -> Dataset:
    """Written and read back: what a PACS receives."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


# --- tests ----------------------------------------------------------------------------------------------

def test_every_lexicon_concept_has_its_dicom_code() -> None:
    from ui.lexicon import CONCEPTS

    assert set(codes.CONCEPT_CODES) == set(CONCEPTS)
    assert codes.LABELS == CONCEPTS  # units carry the labels: the label -> code lookup must match ui's
    cid_of = {"Shape": 6004, "Margins": 6006, "Calcification Type": 6010, "Single Image Finding": 6014}
    for cid, (name, value) in codes.CONCEPT_CODES.items():
        group = cid_concepts[cid_of[name.meaning]]
        standard = {(s, getattr(getattr(dcm_codes, s), kw).value) for s, kws in group.items() for kw in kws}
        assert (value.scheme_designator, value.value) in standard, cid
    table = codes.table_markdown()
    assert all(value.value in table for _, value in codes.CONCEPT_CODES.values())
    name, value = codes.concept("mass margin: spiculated")
    assert (name.value, value.value) == ("111037", "129742005")
    assert codes.concept("some note")[1].scheme_designator == codes.SCHEME
    assert codes.concept("some note") == codes.concept("some note")


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_objects_conform_to_their_iods(case: str, request: pytest.FixtureRequest) -> None:
    dicom_validate.require_dciodvfy()
    objects, maps = request.getfixturevalue(f"{case}_objects")
    assert [o.SOPClassUID for o in objects] == [SR_CLASS] + [PM_CLASS, SC_CLASS] * len(maps)
    for obj in objects:
        assert dicom_validate.errors(obj) == [], obj.SOPClassUID


KNOWN_WARNINGS = ("Unrecognized defined term <99MEDXPLAIN>",  # a private scheme is never a registered term
                  "Unrecognized defined term <QUANTITY>")  # highdicom's derived pixel contrast of parametric maps


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_validator_warnings_are_the_known_ones(case: str, request: pytest.FixtureRequest) -> None:
    dicom_validate.require_dciodvfy()
    objects, _ = request.getfixturevalue(f"{case}_objects")
    for obj in objects:
        assert [w for w in dicom_validate.warnings(obj) if not any(k in w for k in KNOWN_WARNINGS)] == []


def test_validator_reports_errors() -> None:
    dicom_validate.require_dciodvfy()
    broken = Dataset()  # an SC without its mandatory modules
    broken.file_meta = FileMetaDataset()
    broken.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    broken.SOPClassUID, broken.SOPInstanceUID = SC_CLASS, generate_uid()
    assert dicom_validate.errors(broken)


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_parametric_maps_hold_the_float_maps(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source = request.getfixturevalue(case)
    objects, maps = request.getfixturevalue(f"{case}_objects")
    source_uids = [ds.SOPInstanceUID for ds in source.datasets]
    for (method, grid), pm in zip(maps.items(), objects[1::2]):
        pm = roundtrip(pm, tmp_path, method)
        values, refs = pm_frames(pm)
        expected = source.to_frames(grid)
        assert sorted(refs) == sorted(source_uids)
        for frame, uid in zip(values, refs):
            np.testing.assert_array_equal(frame, expected[source_uids.index(uid)])
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
        assert mapping.LUTLabel == method
        spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        expected_spacing = source.datasets[0].get("PixelSpacing") or source.datasets[0].ImagerPixelSpacing
        np.testing.assert_allclose([float(v) for v in spacing], [float(v) for v in expected_spacing])


def test_mri_map_shares_the_series_geometry(mri: DicomSource, mri_objects) -> None:
    pm = mri_objects[0][1]
    assert pm.FrameOfReferenceUID == mri.datasets[0].FrameOfReferenceUID
    positions = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID:
                 [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                 for f in pm.PerFrameFunctionalGroupsSequence}
    for ds in mri.datasets:
        np.testing.assert_allclose(positions[ds.SOPInstanceUID], [float(v) for v in ds.ImagePositionPatient])
    orientation = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation],
                               [float(v) for v in mri.datasets[0].ImageOrientationPatient], atol=1e-6)


def test_mammogram_map_declares_a_detector_plane_frame(mammo: DicomSource, mammo_objects, mri_objects) -> None:
    pm_a, pm_b = mammo_objects[0][1], mammo_objects[0][3]
    assert "FrameOfReferenceUID" not in mammo.datasets[0]
    assert pm_a.FrameOfReferenceUID == pm_b.FrameOfReferenceUID  # derived from the source image, per image
    frame = pm_a.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert frame.SpatialLocationsPreserved == "YES"
    assert pm_a.Laterality == mammo.datasets[0].ImageLaterality


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_report_content_equals_the_response(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    response = mammo_response() if case == "mammo" else mri_response()
    sr = roundtrip(request.getfixturevalue(f"{case}_objects")[0][0], tmp_path, "sr")
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert codes.SCHEME in [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    groups = sr_groups(sr)
    prediction = groups["prediction"]
    probabilities = response["prediction"]["probabilities"]
    found = numbers(prediction)
    assert {c: found[f"Probability of {c}"] for c in probabilities} == probabilities
    label_index = response["prediction"]["label_index"]
    assert ("Predicted class", codes.SCHEME, f"class-{label_index}") in coded(prediction)
    texts = {c.ConceptNameCodeSequence[0].CodeMeaning: c.TextValue for c in prediction if c.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == response["model"]["name"]
    params = [c.TextValue for c in prediction if c.ValueType == "TEXT"
              and c.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
    assert any(response["model"].get("archive_digest", "fedcba9876543210" * 4) in p for p in params)
    for unit in response["units"]:
        got = numbers(groups[f"unit {unit['unit']}"])
        want = {"Unit activation": unit["activation"], "Unit weight": unit["weight"],
                "Unit contribution": unit["contribution"], "Unit rank": unit["rank"]}
        assert got == {k: v for k, v in want.items() if v is not None}  # null results are left out, not zeroed
    if case == "mammo":
        decision = response["prediction"]["decision"]
        assert ("Calibrated decision", codes.SCHEME, f"class-{decision['label_index']}") in coded(prediction)
        assert found["Lesion score"] == decision["lesion_score"]
        assert set(coded(groups["unit 12"])) == {("Margins", "SCT", "129742005"), ("Shape", "SCT", "49608001")}
        assert coded(groups["unit 40"]) == [("Calcification Type", "DCM", "111344")]
        assert coded(groups["unit 3"])[0][1] == codes.SCHEME
    else:
        for row in response["regions"]["gradcam"]:
            got = numbers(groups[f"gradcam region {row['index']}"])
            assert got["Region relevance sum"] == row["sum"]
            assert got["Region relevance per voxel"] == row["per_voxel"]
            assert got["Region voxel count"] == row["voxels"]


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_objects_reference_the_sources_and_join_their_study(case: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue(case)
    objects, _ = request.getfixturevalue(f"{case}_objects")
    first = source.datasets[0]
    uids = {ds.SOPInstanceUID for ds in source.datasets}
    for obj in objects:
        for keyword in IDENTITY:
            assert str(obj.get(keyword)) == str(first.get(keyword)) != "None", keyword
        assert obj.SeriesInstanceUID != first.SeriesInstanceUID
    evidence = objects[0].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == uids
    library = [item for _, name, item in content_items(objects[0].ContentSequence)
               if item.ValueType == "IMAGE"]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library} == uids
    for sc in objects[2::2]:
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        (ref,) = sc.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID in uids
    if case == "mri":  # the overlay shows the slice through the map's peak (slice 4 of the fixture)
        assert objects[2].SourceImageSequence[0].ReferencedSOPInstanceUID == source.datasets[4].SOPInstanceUID


def test_report_keeps_the_most_relevant_regions(mri: DicomSource) -> None:
    from medxplain_dicom.report import REGION_ROWS

    response = mri_response()
    rows = [{"index": i, "name": f"R{i}", "hemisphere": None, "voxels": 10, "sum": float(100 - i),
             "per_voxel": 0.1, "rank": i + 1} for i in range(REGION_ROWS + 5)]
    response["regions"] = {"gradcam": rows[::-1]}  # order in the body must not matter, rank does
    sr = render_objects(response, mri, {}, ALGORITHM, "req-regions")[0]
    regions = {k for k in sr_groups(sr) if k.startswith("gradcam region")}
    assert regions == {f"gradcam region {i}" for i in range(REGION_ROWS)}


def test_overlay_blends_the_map_on_the_image(mammo: DicomSource, mammo_objects) -> None:
    objects, maps = mammo_objects
    sc, grid = objects[2], maps["cam"]
    rgb = sc.pixel_array.astype(int)
    assert rgb.shape == (*grid.shape, 3)
    low = np.unravel_index(np.argmin(grid), grid.shape)
    high = np.unravel_index(np.argmax(grid), grid.shape)
    assert rgb[low][0] == rgb[low][1] == rgb[low][2]  # the least relevant pixel is the plain grey image
    assert rgb[high][0] > rgb[high][2] + 40  # the most relevant is drawn red


def test_uids_are_new_and_deterministic(mammo: DicomSource, mammo_objects) -> None:
    objects, maps = mammo_objects
    response = mammo_response()
    uids = [(o.SOPInstanceUID, o.SeriesInstanceUID) for o in objects]
    source = {mammo.datasets[0].SOPInstanceUID, mammo.datasets[0].SeriesInstanceUID,
              mammo.datasets[0].StudyInstanceUID}
    flat = [u for pair in uids for u in pair]
    assert len(set(flat)) == len(flat) and not source & set(flat)
    again = render_objects(response, mammo, maps, ALGORITHM, "req-1")
    assert [(o.SOPInstanceUID, o.SeriesInstanceUID) for o in again] == uids
    # highdicom's own random UID (the parametric maps' dimension organization) is derived too
    def dimension_uids(objs):
        return [{i.DimensionOrganizationUID for i in (*o.DimensionOrganizationSequence, *o.DimensionIndexSequence)}
                for o in objs if "DimensionOrganizationSequence" in o]
    first = dimension_uids(objects)
    assert first and all(len(u) == 1 for u in first) and dimension_uids(again) == first
    other_key = render_objects(response, mammo, maps, ALGORITHM, "req-2")
    other_archive = render_objects(response, mammo, maps, Algorithm("ddsm", "1.0", "f" * 64, "0.1.0"), "req-1")
    for other in (other_key, other_archive):
        assert not {o.SOPInstanceUID for o in other} & {u for u, _ in uids}


def test_render_is_all_or_nothing(mammo: DicomSource) -> None:
    good = np.zeros(mammo.display.shape, dtype=np.float32)
    bad = np.zeros((mammo.display.shape[0] - 1, mammo.display.shape[1]), dtype=np.float32)
    with pytest.raises(ValueError):
        render_objects(mammo_response(), mammo, {"cam": good, "gradcam": bad}, ALGORITHM, "req-1")
    (ds,) = mammo.datasets
    no_spacing = copy.deepcopy(ds)
    del no_spacing.ImagerPixelSpacing
    with pytest.raises(UnprocessableInput) as err:
        render_objects(mammo_response(), DicomSource([no_spacing], mammo.display), {"cam": good}, ALGORITHM, "k")
    assert err.value.status == 422 and str(ds.PatientID) not in err.value.message
    no_uid = copy.deepcopy(ds)
    del no_uid.SOPInstanceUID
    with pytest.raises(UnprocessableInput):
        render_objects(mammo_response(), DicomSource([no_uid], mammo.display), {}, ALGORITHM, "k")


def test_malformed_identity_is_refused_without_quoting_it(mammo: DicomSource,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    bad = copy.deepcopy(mammo.datasets[0])
    with pytest.warns(UserWarning):
        bad.PatientBirthDate = "NOTADATE77"  # pydicom warns (and logs) as the value is set
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UnprocessableInput) as err:
            render_objects(mammo_response(), DicomSource([bad], mammo.display),
                           {"cam": np.zeros(mammo.display.shape, np.float32)}, ALGORITHM, "k")
    assert err.value.status == 422 and "PatientBirthDate" in err.value.message
    assert "NOTADATE77" not in err.value.message
    assert not [r for r in caplog.records if "NOTADATE77" in r.getMessage()]
    assert not [w for w in seen if "NOTADATE77" in str(w.message)]


def test_nothing_from_the_headers_is_logged(mammo: DicomSource, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    maps = maps_for(mammo, ("cam",))
    render_objects(mammo_response(), mammo, maps, ALGORITHM, "req-log")
    (ds,) = mammo.datasets
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyInstanceUID)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [s for s in secrets if s in logged]


def test_render_leaves_the_source_headers_unchanged(mammo: DicomSource) -> None:
    (ds,) = mammo.datasets
    partial = copy.deepcopy(ds)
    del partial.StudyTime, partial.ReferringPhysicianName  # Type 2: the derived objects get them empty
    before = copy.deepcopy(partial)
    objects = render_objects(mammo_response(), DicomSource([partial], mammo.display),
                             {"cam": np.ones(mammo.display.shape, np.float32)}, ALGORITHM, "k")
    assert partial == before and "FrameOfReferenceUID" not in partial
    assert all(o.StudyTime in ("", None) for o in objects)


def test_non_finite_map_values_are_stored_as_zero(mammo: DicomSource) -> None:
    grid = np.random.default_rng(9).random(mammo.display.shape, dtype=np.float32)
    grid[0, 0], grid[1, 1] = np.nan, np.inf
    pm = render_objects(mammo_response(), mammo, {"cam": grid}, ALGORITHM, "req-nan")[1]
    values, _ = pm_frames(pm)
    expected = np.where(np.isfinite(grid), grid, 0)
    np.testing.assert_array_equal(values[0], expected)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(expected.max()))


@pytest.mark.parametrize("case", ["mammo", "mri"])
def test_objects_are_stored_compressed_and_lossless(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Maps deflated, overlays JPEG-LS lossless (values read back: the float-map and overlay tests above)."""
    objects, _ = request.getfixturevalue(f"{case}_objects")
    for obj in objects[1:]:
        written = roundtrip(obj, tmp_path, "obj")
        want = "1.2.840.10008.1.2.1.99" if obj.SOPClassUID == PM_CLASS else "1.2.840.10008.1.2.4.80"
        assert written.file_meta.TransferSyntaxUID == want
