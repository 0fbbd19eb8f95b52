"""``output=dicom`` on the KServe runtime: the same DICOM files as TorchServe's multipart parts, over OIP v2.

Both real servers run on loopback (tests/conftest.py). TorchServe answers with a multipart/related
body; the KServe runtime with the one BYTES output ``dicom`` (one Part-10 file an element, REST binary
extension / gRPC raw contents). Files are compared byte for byte, or, where they differ, as parsed
datasets without the date/time elements stamped with the wall clock (:data:`WALL_CLOCK`), re-encoded;
every UID (SOP, series, frame of reference, a Parametric Map's dimension organization), derived from
the input, the archive and the request, must be equal.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from medxplain_client import Client, ClientError
from medxplain_client.__main__ import series_zip
from tests import hostile
from tests.kserve_support import grpc_answer, grpc_transport, v1_rest, v2_rest, v2_tensors
from tests.test_dicom_serving import _by_class

# Stamped with the wall clock when an object is built (highdicom's content and instance creation
# date/time, the overlay's date/time of secondary capture, the contributing equipment's date/time):
# two renders of one request, on one runtime too, differ there only.
WALL_CLOCK = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime",
              "DateOfSecondaryCapture", "TimeOfSecondaryCapture")


@pytest.fixture(scope="module")
def mammogram(ddsm_data) -> Path:
    return min((ddsm_data / "dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def mri_series(adni_data) -> Path:
    """The series folder of the first subject the generator wrote as DICOM."""
    with open(adni_data / "subjects.csv", newline="") as f:
        return adni_data / next(r for r in csv.DictReader(f) if r["dicom_path"])["dicom_path"]


@pytest.fixture(scope="module")
def oip_clients(kserve):
    with Client(kserve.inference_url, token=kserve.token(), transport="oip-rest", timeout=300, retries=0) as rest, \
         Client(grpc_target=kserve.grpc_target, token=kserve.token(), transport="oip-grpc", timeout=300,
                retries=0) as grpc_client:
        yield {"oip-rest": rest, "oip-grpc": grpc_client}


def _without_wall_clock(part: bytes) -> bytes:
    """The file re-encoded without :data:`WALL_CLOCK` (top level and nested), to compare everything else."""
    ds = dcmread(io.BytesIO(part))
    stack = [ds]
    while stack:
        dataset = stack.pop()
        for keyword in WALL_CLOCK:
            if keyword in dataset:
                delattr(dataset, keyword)
        stack += [item for element in dataset if element.VR == "SQ" for item in element.value]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _differing(a: bytes, b: bytes) -> list[str]:
    """The paths of the elements that differ (for a failure's message)."""
    out: list[str] = []

    def walk(x, y, path: str) -> None:
        for tag in sorted(set(x.keys()) | set(y.keys())):
            ex, ey = x.get(tag), y.get(tag)
            name = f"{path}{ex.keyword if ex is not None else ey.keyword or tag}"
            if ex is None or ey is None or ex.VR != ey.VR:
                out.append(name)
            elif ex.VR == "SQ":
                if len(ex.value) != len(ey.value):
                    out.append(name)
                for k, (ix, iy) in enumerate(zip(ex.value, ey.value)):
                    walk(ix, iy, f"{name}[{k}].")
            elif ex.value != ey.value:
                out.append(name)

    walk(dcmread(io.BytesIO(a)), dcmread(io.BytesIO(b)), "")
    return out[:20]


def _assert_same_files(got: list[bytes], want: list[bytes]) -> list[int]:
    """Same count, order, SOP classes and UIDs; each file byte-identical, or identical but for the elements of
    :data:`WALL_CLOCK`. Returns the indices of the files that differed there."""
    assert len(got) == len(want) and want
    differed = []
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        da, db = (dcmread(io.BytesIO(p), stop_before_pixels=True) for p in (a, b))
        assert (str(da.SOPClassUID), str(da.SOPInstanceUID)) == (str(db.SOPClassUID), str(db.SOPInstanceUID)), i
        assert str(da.SeriesInstanceUID) == str(db.SeriesInstanceUID), i
        if a != b:
            assert _without_wall_clock(a) == _without_wall_clock(b), (i, _differing(a, b))
            differed.append(i)
    return differed


def test_mammogram_same_dicom_files_as_torchserve(torchserve_client, oip_clients, mammogram):
    want = torchserve_client.dicom("ddsm", mammogram, methods="cam,gradcam", top_k=3)
    assert [len(v) for v in _by_class([dcmread(io.BytesIO(p)) for p in want]).values()] == [1, 2, 2]
    for client in oip_clients.values():
        _assert_same_files(client.dicom("ddsm", mammogram, methods="cam,gradcam", top_k=3), want)


def test_mri_series_same_dicom_files_as_torchserve(torchserve_client, oip_clients, mri_series):
    payload = series_zip(mri_series)
    want = torchserve_client.dicom("adni", payload, methods="gradcam", top_k=3)
    for client in oip_clients.values():
        _assert_same_files(client.dicom("adni", payload, methods="gradcam", top_k=3), want)


def test_the_dicom_output_as_sent(kserve, mammogram):
    """REST: one BYTES output ``dicom`` [N], binary, content type application/dicom, no JSON ``result``;
    gRPC: the same in raw_output_contents."""
    body = mammogram.read_bytes()
    r = v2_rest(kserve, "ddsm", body, {"output": "dicom", "top_k": 2})
    assert r.status_code == 200, r.text[:300]
    header = json.loads(r.content[:int(r.headers["Inference-Header-Content-Length"])])
    [spec] = header["outputs"]
    assert (spec["name"], spec["datatype"], spec["shape"]) == ("dicom", "BYTES", [1])  # no explain: the SR alone
    assert spec["parameters"]["content_type"] == "application/dicom"
    raw = v2_tensors(r)["dicom"][2]
    size = int.from_bytes(raw[:4], "little")
    assert size == len(raw) - 4 and raw[4 + 128:4 + 132] == b"DICM"  # one Part-10 file
    t = grpc_transport(kserve)
    reply = t.infer(t.request("ddsm", body, {"output": "dicom", "explain": "cam"}, False))
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("dicom", "BYTES", [3])]
    assert reply.outputs[0].parameters["content_type"].string_param == "application/dicom"
    assert len(reply.raw_output_contents) == 1


@pytest.mark.parametrize(("params", "error"), [
    ({"output": "dicom", "unit_maps": "true"}, "bad_parameter"),
    ({"output": "dcm"}, "bad_parameter"),
    ({"output": "dicom", "explain": "nope"}, "unknown_method"),
])
def test_bad_dicom_requests_same_errors_as_torchserve(torchserve_client, kserve, mammogram, params, error):
    with pytest.raises(ClientError) as caught:
        torchserve_client.predict("ddsm", mammogram, **params)
    ts = (caught.value.status, caught.value.error)
    assert ts[0] == 400 and ts[1] == error
    r = v2_rest(kserve, "ddsm", mammogram.read_bytes(), params)
    assert (r.status_code, hostile.check_answer(hostile.Answer(r.status_code, r.content))["error"]) == ts
    answer = grpc_answer(grpc_transport(kserve), "ddsm", mammogram.read_bytes(), params)
    assert (answer.status, hostile.check_answer(answer)["error"]) == ts


def test_dicom_of_a_png_refused_as_on_torchserve(torchserve_client, oip_clients, ddsm_data):
    png = min((ddsm_data / "images").glob("*.png"))
    for client in (torchserve_client, *oip_clients.values()):
        with pytest.raises(ClientError) as caught:
            client.dicom("ddsm", png, methods="cam")
        assert (caught.value.status, caught.value.error) == (400, "dicom_output_needs_dicom_input")


def test_what_only_oip_refuses(kserve, mammogram):
    """v1 cannot carry the files (JSON only); an Accept of multipart/related asks for a form OIP has not;
    heatmap tensors belong to the JSON answer. Each a 400 with the usual body."""
    body = mammogram.read_bytes()
    r = v1_rest(kserve, "ddsm", {"data": base64.b64encode(body).decode(), "output": "dicom"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_output")
    headers = {**kserve.auth_header(), "Accept": 'multipart/related; type="application/dicom"'}
    r = requests.post(f"{kserve.inference_url}/v1/models/ddsm:predict", headers=headers, timeout=300,
                      json={"instances": [{"data": base64.b64encode(body).decode()}]})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_output")
    element = len(body).to_bytes(4, "little") + body
    header = json.dumps({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    r = requests.post(f"{kserve.inference_url}/v2/models/ddsm/infer", data=header + element, timeout=300,
                      headers={**headers, "Inference-Header-Content-Length": str(len(header))})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_output")
    r = v2_rest(kserve, "ddsm", body, {"output": "dicom", "explain": "cam"}, outputs=("heatmaps",))
    assert (r.status_code, r.json()["error"]) == (400, "bad_parameter")
    assert v2_rest(kserve, "ddsm", body, {"top_k": 1}).status_code == 200  # the same file answers as JSON


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_cli_oip_output_dicom_writes_the_objects(kserve, torchserve_client, mammogram, tmp_path, transport):
    from medxplain_client.__main__ import main as cli

    where = ["--url", kserve.inference_url] if transport == "rest" else ["--grpc", kserve.grpc_target]
    out = tmp_path / "out"
    code = cli(["explain", "--model", "ddsm", "--input", str(mammogram), "--explain", "cam", "--output", "dicom",
                "--oip", *where, "--token-file", str(kserve.token_file), "--out", str(out)])
    assert code == 0
    written = sorted(out.glob("*.dcm"))
    assert [p.name.rsplit("-", 1)[1] for p in written] == ["sr.dcm", "pm.dcm", "sc.dcm"]
    _assert_same_files([p.read_bytes() for p in written], torchserve_client.dicom("ddsm", mammogram, methods="cam"))


def test_cli_oip_output_dicom_stores_in_the_pacs(kserve, orthanc_server, mammogram, tmp_path, monkeypatch):
    """``--oip --output dicom --stow URL``: every object in the PACS under the source study, once."""
    from medxplain_client.__main__ import main as cli
    from medxplain_contract import dicomweb

    monkeypatch.setenv("MEDXAI_DICOMWEB_ENV_FILE", str(orthanc_server.write_env_file(tmp_path / "orthanc.env")))
    pacs = dicomweb.connect(orthanc_server.dicomweb_url, dicomweb.DicomwebConfig(*orthanc_server.auth))
    study = str(dcmread(mammogram, stop_before_pixels=True).StudyInstanceUID)
    before = pacs.count_instances(study)
    args = ["explain", "--model", "ddsm", "--input", str(mammogram), "--explain", "gradcam", "--top-k", "2",
            "--output", "dicom", "--stow", orthanc_server.dicomweb_url, "--oip", "--grpc", kserve.grpc_target,
            "--token-file", str(kserve.token_file), "--out", str(tmp_path / "out")]
    assert cli(args) == 0
    assert pacs.count_instances(study) == before + 3
    assert cli(args) == 0  # deterministic UIDs: the same objects again, nothing stored twice
    assert pacs.count_instances(study) == before + 3
