"""A real PACS: Orthanc with its DICOMweb plugin (conftest's ``orthanc_server``), batch from and to it.

Synthetic mammograms with made-up patient tags are stored in Orthanc over STOW-RS, the batch job
reads them back over QIDO-RS / WADO-RS and, with ``--stow``, stores its derived objects there;
the objects are read back (WADO-RS) and checked against the run's JSON in MinIO and validated with
``dciodvfy``. Tests that need the engine's DICOM stage (``Engine.run_prepared(with_dicom=True)``)
or the DICOM series decoder say so when they skip.
"""

from __future__ import annotations

import inspect
import io
import json
import shutil
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage, generate_uid

from batch.pseudonyms import Pseudonyms
from batch.runner import RunOptions, run_batch
from batch.sink import MARKER, DicomSink
from batch.sources import Source, plan_items
from devstack.services import free_port
from medxplain_contract import dicomweb
from medxplain_contract.multipart import decode_related, sniff_boundary
from medxplain_contract.runs import RunReader
from medxplain_contract.storage import Bucket, S3Config
from medxplain_dicom.algorithm import MANUFACTURER
from medxplain_engine.engine import Engine
from tests import dicom_validate
from tests.batch_support import cli, env_file, objects, read
from tests.test_dicom_outputs import numbers, pm_frames, sr_groups

BUCKET = "pacs-test"
ID_KEY = b"pacs-test-id-key-0123456789"
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
WITH_DICOM = "with_dicom" in inspect.signature(Engine.run_prepared).parameters
needs_dicom_stage = pytest.mark.skipif(not WITH_DICOM, reason="needs Engine.run_prepared(with_dicom=True), "
                                       "the engine's DICOM stage (issue 14, lead)")


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(minio_server) -> S3Config:
    return S3Config(minio_server.endpoint, False, minio_server.access_key, minio_server.secret_key)


@pytest.fixture(scope="module")
def pacs_config(orthanc_server) -> dicomweb.DicomwebConfig:
    return dicomweb.DicomwebConfig(*orthanc_server.auth)


@pytest.fixture(scope="module")
def pacs(orthanc_server, pacs_config) -> dicomweb.Pacs:
    return dicomweb.connect(orthanc_server.dicomweb_url, pacs_config)


@pytest.fixture(scope="module")
def pacs_env(orthanc_server, tmp_path_factory) -> Path:
    return orthanc_server.write_env_file(tmp_path_factory.mktemp("pacs-env") / "orthanc.env")


@pytest.fixture(scope="module")
def mammo_study(ddsm_data, pacs) -> dict:
    """The synthetic set's DICOM mammograms (one case: one study, one series per view) stored in Orthanc."""
    files = sorted((ddsm_data / "dicom").glob("*.dcm"))
    assert files, "the synthetic set has DICOM files"
    datasets = [pydicom.dcmread(f) for f in files]
    assert len({str(d.StudyInstanceUID) for d in datasets}) == 1
    pacs.store(datasets)
    return {"files": files, "study": str(datasets[0].StudyInstanceUID),
            "sops": {str(d.SOPInstanceUID): f for d, f in zip(datasets, files)},
            "identity": {str(getattr(d, t)) for d in datasets for t in PATIENT_TAGS}}


def _instances(pacs: dicomweb.Pacs, study: str | None = None) -> int:
    return pacs.count_instances(study)


def _options(model_store, s3, pacs_config, **kwargs) -> RunOptions:
    base = {"model": "ddsm", "archive": model_store / "ddsm.mar", "s3": s3, "dicomweb": pacs_config,
            "threads": 2, "batch_size": 2, "progress": False, "id_key": ID_KEY, "top_k": 3}
    return RunOptions(**(base | kwargs))


def _bare(kind: str, study: str, modality: str, sop_class: str, **extra) -> Dataset:
    """A non-image object (no pixel data) with made-up patient tags, as an SR or RT plan would be."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["pacs-test", kind, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["pacs-test", kind, "series"])
    ds.PatientName, ds.PatientID = "SYNTHETIC^BADINPUT", "SYN-PID-BAD001"
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


# -- the server and the client ----------------------------------------------------------------------

def test_orthanc_refuses_requests_without_the_password_and_serves_its_explorer(orthanc_server):
    root = orthanc_server.dicomweb_url
    assert orthanc_server.port not in (8042, 4242)
    assert requests.get(f"{root}/studies", timeout=10).status_code == 401
    assert requests.get(f"{root}/studies", auth=(orthanc_server.username, "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{root}/studies", auth=orthanc_server.auth, timeout=10).status_code == 200
    page = requests.get(orthanc_server.explorer_url, auth=orthanc_server.auth, timeout=10)
    assert page.status_code == 200 and "html" in page.headers.get("Content-Type", "")
    config = orthanc_server.config()
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["DicomServerEnabled"] is False  # DICOMweb only: no DIMSE port open
    assert (orthanc_server.workdir / "orthanc.json").stat().st_mode & 0o077 == 0  # it holds the password


def test_credentials_come_from_the_environment_files_or_an_env_file_never_the_url(tmp_path):
    env = {"MEDXAI_DICOMWEB_USERNAME": "alice", "MEDXAI_DICOMWEB_PASSWORD": "s3cret-pw"}
    config = dicomweb.DicomwebConfig.from_env(env)
    assert (config.username, config.password) == ("alice", "s3cret-pw")
    assert "s3cret-pw" not in repr(config)
    (tmp_path / "pw").write_text("from-file\n")
    config = dicomweb.DicomwebConfig.from_env({"MEDXAI_DICOMWEB_USERNAME": "bob",
                                               "MEDXAI_DICOMWEB_PASSWORD_FILE": str(tmp_path / "pw")})
    assert config.password == "from-file"
    (tmp_path / "pacs.env").write_text("MEDXAI_DICOMWEB_USERNAME=carol\nMEDXAI_DICOMWEB_PASSWORD='pw3'\n")
    config = dicomweb.DicomwebConfig.from_env({"MEDXAI_DICOMWEB_ENV_FILE": str(tmp_path / "pacs.env")})
    assert (config.username, config.password) == ("carol", "pw3")
    with pytest.raises(dicomweb.PacsConfigError, match="MEDXAI_DICOMWEB_PASSWORD"):
        dicomweb.DicomwebConfig.from_env({"MEDXAI_DICOMWEB_USERNAME": "dave"})
    with pytest.raises(dicomweb.PacsConfigError) as err:
        dicomweb.check_url("http://eve:hunter2@pacs.example:8042/dicom-web")
    assert "hunter2" not in str(err.value) and "MEDXAI_DICOMWEB" in str(err.value)
    assert dicomweb.display_url("https://pacs.example:443/dicom-web/?token=x") == "https://pacs.example:443/dicom-web"
    with pytest.raises(dicomweb.PacsConfigError):
        dicomweb.check_uid("1.2.3/../../system")


def test_a_wrong_password_is_one_line_naming_the_service_not_the_secret(orthanc_server):
    bad = dicomweb.DicomwebConfig(orthanc_server.username, "not-the-password-xyz")
    with pytest.raises(dicomweb.PacsAuthError) as err:
        dicomweb.connect(orthanc_server.dicomweb_url, bad)
    message = str(err.value)
    assert "refused the credentials" in message and orthanc_server.dicomweb_url in message
    assert "not-the-password-xyz" not in message and "\n" not in message
    with pytest.raises(dicomweb.PacsError, match="cannot reach the PACS"):
        dicomweb.connect(f"http://127.0.0.1:{free_port()}/dicom-web", bad)  # nothing listens there


def test_retrieve_returns_the_stored_file_and_caps_its_size(pacs, mammo_study):
    sop, path = next(iter(mammo_study["sops"].items()))
    series = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    [data] = pacs.retrieve(mammo_study["study"], series, sop, max_bytes=1 << 30)
    assert data == path.read_bytes()  # transfer-syntax=*: the bytes as stored, not transcoded
    with pytest.raises(dicomweb.PacsTooLarge):
        pacs.retrieve(mammo_study["study"], series, sop, max_bytes=1000)


def _secondary_captures(source: Path, n: int) -> list[Dataset]:
    """RGB overlays built with highdicom on a source mammogram's header (deterministic UIDs), in a study of
    their own so that the batch tests' study holds only what the batch job stores."""
    ref = pydicom.dcmread(source)
    ref.StudyInstanceUID = generate_uid(entropy_srcs=["pacs-test-sc", "study"])
    pixels = np.zeros((int(ref.Rows), int(ref.Columns), 3), np.uint8)
    pixels[..., 0] = 200
    series = generate_uid(entropy_srcs=["pacs-test-sc", str(ref.SOPInstanceUID)])
    return [highdicom.sc.SCImage.from_ref_dataset(
        ref, pixels, "RGB", 8, "PATIENT", series, 90, generate_uid(entropy_srcs=["pacs-test-sc", str(k)]), k + 1,
        "MedXplain", patient_orientation=("A", "R"), laterality=str(ref.ImageLaterality)) for k in range(n)]


def test_the_sink_stores_all_objects_once_and_writes_a_marker_without_uids(pacs, mammo_study, s3, tmp_path):
    source = next(iter(mammo_study["sops"].values()))
    datasets = _secondary_captures(source, 2)
    out = Bucket(s3, BUCKET)
    out.ensure(create=True)
    sink = DicomSink(pacs, out, "sink-test")
    before = _instances(pacs)
    record = sink.store(datasets)
    assert _instances(pacs) == before + 2
    assert record["objects"] == 2 and record["kinds"] == {"Secondary Capture Image Storage": 2}
    assert record["sha256"] == dicomweb.digest([dicomweb.encode(d) for d in datasets])
    text = json.dumps(record)
    assert not any(str(d.SOPInstanceUID) in text or str(d.StudyInstanceUID) in text for d in datasets)
    # a second STOW of the same SOP instances (a crash between STOW and marker) stores nothing twice:
    # Orthanc answers them as stored and keeps its first copy
    assert sink.store(datasets)["objects"] == 2
    assert _instances(pacs) == before + 2
    for ds in datasets:  # read back over WADO-RS: attached to the source study, valid DICOM
        [data] = pacs.retrieve(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                               max_bytes=1 << 30)
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.StudyInstanceUID == ds.StudyInstanceUID and back.PatientID == pydicom.dcmread(source).PatientID
        (tmp_path / "sc.dcm").write_bytes(data)
        assert dicom_validate.errors(tmp_path / "sc.dcm") == []


def test_a_refused_instance_fails_the_whole_store(pacs):
    broken = Dataset()  # no UIDs: Orthanc cannot index it
    broken.file_meta = FileMetaDataset()
    broken.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    broken.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.SOPClassUID, broken.SOPInstanceUID = RTPlanStorage, broken.file_meta.MediaStorageSOPInstanceUID
    with pytest.raises(dicomweb.PacsError) as err:
        pacs.store([broken])
    assert broken.SOPInstanceUID not in str(err.value)


# -- batch from the PACS ----------------------------------------------------------------------------

def test_batch_from_dicomweb_equals_the_same_files_from_a_folder(pacs, mammo_study, model_store, s3, pacs_config,
                                                                  tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    for f in mammo_study["files"]:
        shutil.copy(f, folder / f.name)
    url = pacs.url
    remote = run_batch(_options(model_store, s3, pacs_config, input=url, study=mammo_study["study"],
                                output=f"s3://{BUCKET}/from-pacs"))
    local = run_batch(_options(model_store, s3, pacs_config, input=str(folder), output=f"s3://{BUCKET}/from-folder"))
    assert remote.exit_code == local.exit_code == 0 and remote.processed == local.processed == len(mammo_study["files"])
    client = s3.client()
    reader_remote, reader_local = RunReader(Bucket(s3, BUCKET), "from-pacs"), RunReader(Bucket(s3, BUCKET), "from-folder")
    ids = Pseudonyms(ID_KEY)
    for sop, path in mammo_study["sops"].items():
        series = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        remote_id = ids.item_id(f"studies/{mammo_study['study']}/series/{series}/instances/{sop}")
        local_id = ids.item_id(path.name)
        a, b = reader_remote.result(remote_id), reader_local.result(local_id)
        assert a["prediction"] == b["prediction"] and a["units"] == b["units"]
    # pseudonyms only: no UID and no patient tag in any key or JSON object outside private/
    secrets_ = set(mammo_study["sops"]) | {mammo_study["study"]} | mammo_study["identity"]
    for key in objects(client, BUCKET, "from-pacs"):
        assert not any(s in key for s in secrets_), key
        if key.endswith(".json") and not key.startswith("private/"):
            text = read(client, BUCKET, f"from-pacs/{key}").decode()
            assert not any(s in text for s in secrets_), key
    again = run_batch(_options(model_store, s3, pacs_config, input=url, study=mammo_study["study"],
                               output=f"s3://{BUCKET}/from-pacs"))
    assert again.processed == 0 and again.skipped == len(mammo_study["files"])


def test_a_wrong_pacs_password_exits_2_with_one_line_before_any_work(orthanc_server, minio_server, model_store,
                                                                      mammo_study, tmp_path):
    bad_env = tmp_path / "bad.env"
    bad_env.write_text(f"MEDXAI_DICOMWEB_USERNAME={orthanc_server.username}\n"
                       "MEDXAI_DICOMWEB_PASSWORD=wrong-password-123\n")
    s3_env = env_file(minio_server, tmp_path / "minio.env")
    for extra in (["--input", orthanc_server.dicomweb_url],
                  ["--input", str(mammo_study["files"][0].parent), "--stow", orthanc_server.dicomweb_url]):
        proc = cli("run", "--model", "ddsm", "--archive", str(model_store / "ddsm.mar"), *extra,
                   "--output", f"s3://{BUCKET}/wrong-password", "--s3-env", str(s3_env),
                   "--dicomweb-env", str(bad_env), "--no-progress")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "refused the credentials" in lines[0], proc.stderr
        assert "wrong-password-123" not in proc.stderr + proc.stdout
    assert objects(minio_server.client(), BUCKET, "wrong-password") == {}  # nothing was started


def test_non_image_objects_in_a_study_are_failure_records_and_nothing_is_stored(pacs, model_store, s3, pacs_config):
    study = generate_uid(entropy_srcs=["pacs-test", "bad-study"])
    bad = [_bare("sr", study, "SR", "1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
           _bare("rtplan", study, "RTPLAN", RTPlanStorage)]
    pacs.store(bad)
    before = _instances(pacs)
    result = run_batch(_options(model_store, s3, pacs_config, input=pacs.url, study=study, modality="any",
                                stow=pacs.url, output=f"s3://{BUCKET}/bad-inputs"))
    assert result.exit_code == 1 and len(result.failed) == 2 and result.processed == 0
    assert set(result.failed.values()) == {"not_an_image"}
    assert _instances(pacs) == before
    client = s3.client()
    failures = [k for k in objects(client, BUCKET, "bad-inputs") if k.startswith("failures/")]
    assert len(failures) == 2
    for key in failures:  # a clear 4xx record that names no UID and no patient tag
        record = json.loads(read(client, BUCKET, f"bad-inputs/{key}"))
        assert record["status"] == 415 and "SYN-PID" not in json.dumps(record)
        assert not any(str(d.SOPInstanceUID) in json.dumps(record) for d in bad)
    assert not any(k.startswith("items/") and k.endswith(MARKER) for k in objects(client, BUCKET, "bad-inputs"))


def test_stow_of_a_non_dicom_input_is_that_items_failure(ddsm_data, pacs, model_store, s3, pacs_config, tmp_path):
    folder = tmp_path / "png"
    folder.mkdir()
    png = min((ddsm_data / "images").glob("*.png"))
    shutil.copy(png, folder / png.name)
    before = _instances(pacs)
    result = run_batch(_options(model_store, s3, pacs_config, input=str(folder), stow=pacs.url,
                                output=f"s3://{BUCKET}/png-stow"))
    assert result.exit_code == 1 and list(result.failed.values()) == ["dicom_output_unavailable"]
    assert _instances(pacs) == before
    assert not any(k.startswith("items/") for k in objects(s3.client(), BUCKET, "png-stow"))


def test_a_series_folder_is_one_mri_item_read_as_one_multipart_body(ddsm_data, tmp_path):
    root = tmp_path / "adni-source"
    series = root / "dicom" / "S0001"
    series.mkdir(parents=True)
    files = sorted((ddsm_data / "dicom").glob("*.dcm"))[:3]  # any .dcm files: grouping, not decoding, is tested
    for k, f in enumerate(files):
        shutil.copy(f, series / f"slice-{k:04d}.dcm")
    (root / "other.nii.gz").write_bytes(b"not read here")
    source = Source(str(root))
    items, origin = plan_items(source, "adni", ["CN", "AD"], None, pseudonyms=Pseudonyms(ID_KEY))
    keys = {i.key: i for i in items}
    assert origin == "none" and set(keys) == {"dicom/S0001/", "other.nii.gz"}
    assert keys["dicom/S0001/"].size == sum(f.stat().st_size for f in files)
    body = source.read("dicom/S0001/")
    parts = decode_related(body, sniff_boundary(body))
    assert parts == [f.read_bytes() for f in files]


# -- batch from the PACS to the PACS (the engine's DICOM stage) -----------------------------------

def _references(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in a dataset."""
    return {str(elem.value) for elem in ds.iterall() if elem.keyword == "ReferencedSOPInstanceUID"}


def _stored_precision(entry: dict) -> dict:
    """How close the run's stored map is to the float map: half a step of its 8-bit scale (PNG, NIfTI),
    float16 rounding otherwise."""
    if entry["encoding"] in ("png", "nifti.gz", "nifti"):
        step = (entry["scale"]["max"] - entry["scale"]["min"]) / 255.0
        return {"rtol": 0.0, "atol": 0.5 * step * 1.001 + 1e-12}
    return {"rtol": 1e-3, "atol": 1e-6}


def _derived_instances(pacs: dicomweb.Pacs, study: str) -> set[tuple[str, str]]:
    """(series UID, SOP instance UID) of every object in the study that MedXplain derived."""
    return {(s["SeriesInstanceUID"], inst["SOPInstanceUID"])
            for s in pacs.series(study) if s["Manufacturer"] == MANUFACTURER
            for inst in pacs.instances(study, s["SeriesInstanceUID"])}


@needs_dicom_stage
def test_batch_from_pacs_to_pacs_and_minio(pacs, mammo_study, model_store, s3, pacs_config):
    study = mammo_study["study"]
    before = _instances(pacs, study)
    earlier = _derived_instances(pacs, study)  # other tests of the session may have stored results here too
    options = _options(model_store, s3, pacs_config, input=pacs.url, study=study, stow=pacs.url,
                       explain=("cam",), output=f"s3://{BUCKET}/to-pacs")
    result = run_batch(options)
    assert result.exit_code == 0, result.failed
    n = len(mammo_study["files"])
    stored = _instances(pacs, study) - before
    assert stored == 3 * n  # per image: an SR, a parametric map and an RGB overlay for cam
    reader = RunReader(Bucket(s3, BUCKET), "to-pacs")
    ids = Pseudonyms(ID_KEY)
    new = _derived_instances(pacs, study) - earlier
    assert new, "the derived series carry the MedXplain manufacturer (batch/sources.py leaves them out)"
    written = []
    for series, sop in new:
        [data] = pacs.retrieve(study, series, sop, max_bytes=1 << 30)
        written.append(pydicom.dcmread(io.BytesIO(data)))
    assert len(written) == stored
    for ds in written:  # every object the run wrote, as the PACS serves it
        assert ds.StudyInstanceUID == study
        assert dicom_validate.errors(ds) == [], (ds.SOPClassUID.name, dicom_validate.errors(ds))
    for sop, path in mammo_study["sops"].items():
        series = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        item = ids.item_id(f"studies/{study}/series/{series}/instances/{sop}")
        marker = json.loads(reader.item_bytes(item, MARKER))
        assert marker["objects"] == 3 and sop not in json.dumps(marker) and study not in json.dumps(marker)
        response = reader.result(item)
        mine = [ds for ds in written if sop in _references(ds)]  # the objects derived from this image
        assert sorted(ds.SOPClassUID.name for ds in mine) == [
            "Comprehensive 3D SR Storage", "Parametric Map Storage", "Secondary Capture Image Storage"]
        [pm] = [ds for ds in mine if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
        values, refs = pm_frames(pm)
        assert refs == [sop]
        cam = reader.heatmap(item, "cam", response)  # the float16 map the run stored in MinIO
        np.testing.assert_allclose(values[0], cam, **_stored_precision(response["heatmaps"]["cam"]))
        [sr] = [ds for ds in mine if ds.Modality == "SR"]
        found = numbers(sr_groups(sr)["prediction"])
        for name, p in response["prediction"]["probabilities"].items():
            assert found[f"Probability of {name}"] == pytest.approx(p, abs=1e-9)
    # a re-run stores nothing twice (and does no work)
    again = run_batch(options)
    assert again.processed == 0 and again.skipped == n and _instances(pacs, study) - before == stored
    # a crash between STOW and marker: the item is redone, the same UIDs are sent again, nothing is added
    out = Bucket(s3, BUCKET)
    victim = reader.item_ids()[0]
    out.remove(f"to-pacs/items/{victim}/{MARKER}")
    out.remove(f"to-pacs/items/{victim}/_complete.json")
    redone = run_batch(options)
    assert redone.processed == 1 and _instances(pacs, study) - before == stored
    assert out.stat(f"to-pacs/items/{victim}/{MARKER}") is not None
    # the derived objects in the study are never taken for inputs: a run over the whole study sees the images only
    listing = run_batch(_options(model_store, s3, pacs_config, input=pacs.url, study=study, modality="any",
                                 output=f"s3://{BUCKET}/after-stow"))
    assert listing.items == n and listing.exit_code == 0


@needs_dicom_stage
def test_mri_series_from_pacs_and_from_a_folder_agree_and_a_gap_is_a_failure(adni_data, pacs, model_store, s3,
                                                                              pacs_config, tmp_path):
    good, gapped = sorted(p for p in (adni_data / "dicom").iterdir() if p.is_dir())[:2]
    good_files = sorted(good.glob("*.dcm"))
    gapped_files = sorted(gapped.glob("*.dcm"))
    del gapped_files[len(gapped_files) // 2]  # a series with a missing slice
    good_sets = [pydicom.dcmread(f) for f in good_files]
    pacs.store(good_sets)
    pacs.store([pydicom.dcmread(f) for f in gapped_files])
    good_study, gapped_study = str(good_sets[0].StudyInstanceUID), str(pydicom.dcmread(gapped_files[0]).StudyInstanceUID)
    before_good, before_gapped = _instances(pacs, good_study), _instances(pacs, gapped_study)
    adni = {"model": "adni", "archive": model_store / "adni.mar", "explain": ("gradcam",)}
    result = run_batch(_options(model_store, s3, pacs_config, input=pacs.url, stow=pacs.url,
                                output=f"s3://{BUCKET}/mri-pacs", **adni))
    assert result.items == 2 and result.processed == 1 and list(result.failed.values()) == ["incomplete_series"]
    assert _instances(pacs, gapped_study) == before_gapped  # nothing stored for the bad series
    assert _instances(pacs, good_study) > before_good
    folder = tmp_path / "series-folder"
    shutil.copytree(good, folder / "S-good")
    local = run_batch(_options(model_store, s3, pacs_config, input=str(folder), output=f"s3://{BUCKET}/mri-folder",
                               **adni))
    assert local.processed == 1 and local.exit_code == 0
    ids = Pseudonyms(ID_KEY)
    remote_id = ids.item_id(f"studies/{good_study}/series/{good_sets[0].SeriesInstanceUID}")
    remote = RunReader(Bucket(s3, BUCKET), "mri-pacs")
    a = remote.result(remote_id)
    b = RunReader(Bucket(s3, BUCKET), "mri-folder").result(ids.item_id("S-good/"))
    assert a["prediction"] == b["prediction"] and a["regions"] == b["regions"]
    # the parametric map holds the run's Grad-CAM map, slice by slice, referencing the source slices
    heatmap = remote.heatmap(remote_id, "gradcam", a)
    derived = [s for s in pacs.series(good_study) if s["Manufacturer"] == MANUFACTURER]
    maps = []
    for s in derived:
        for inst in pacs.instances(good_study, s["SeriesInstanceUID"]):
            [data] = pacs.retrieve(good_study, s["SeriesInstanceUID"], inst["SOPInstanceUID"], max_bytes=1 << 30)
            ds = pydicom.dcmread(io.BytesIO(data))
            assert dicom_validate.errors(ds) == [], (ds.SOPClassUID.name, dicom_validate.errors(ds))
            if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30":
                maps.append(ds)
    [pm] = maps
    values, refs = pm_frames(pm)
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(good_sets)}  # files are written in k order
    frames = np.transpose(heatmap, (2, 1, 0))
    for frame, uid in zip(values, refs):
        np.testing.assert_allclose(frame, frames[slice_of[uid]], **_stored_precision(a["heatmaps"]["gradcam"]))
