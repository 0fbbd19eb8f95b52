"""Hostile requests for the real TorchServe: hypothesis strategies, senders and the answer contract.

Bodies are valid PNG / TIFF / DICOM / NIfTI files mutated at the byte level (flips, truncation,
insertion, splices) and at the structure level (header fields rewritten to extreme or inconsistent
values, with valid checksums so the decoder gets past them). Parameters take any JSON type, and
multipart fields / gRPC inputs any bytes. Expensive-but-valid settings (many IG steps, a small
occlusion stride) are drawn rarely and bounded: the budget tests cover them, the fuzz must stay fast.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

import grpc
import nibabel as nib
import numpy as np
import pydicom
import requests
from hypothesis import strategies as st

from tests import inputs
from tests.schema_check import checked

PARAM_NAMES = ["top_k", "k", "target", "explain", "unit_maps", "encoding", "occlusion_size", "occlusion_stride",
               "ig_steps", "gradcam_layer"]
MAX_MESSAGE = 200


@dataclass
class Case:
    """One request: how it travels, the file and its parameters."""

    transport: str  # raw | multipart | json | grpc
    body: bytes
    params: dict = field(default_factory=dict)  # name -> JSON value, or bytes for multipart / gRPC
    endpoint: str = "predictions"


@dataclass
class Answer:
    status: int
    body: bytes
    reason: str = ""


# --- bodies ---------------------------------------------------------------------------------------

def _png_with_ihdr(png: bytes, width: int, height: int, depth: int, colour: int) -> bytes:
    """Rewrite the IHDR chunk (with a valid CRC) so the decoder believes the new geometry."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def _dicom_with(dicom: bytes, changes: dict) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom))
    for keyword, value in changes.items():
        if keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
            if pydicom.uid.UID(value).is_transfer_syntax and pydicom.uid.UID(value).is_compressed:  # the native pixels become a (bogus) codestream fragment
                from pydicom.encaps import encapsulate

                ds.PixelData = encapsulate([ds.PixelData])
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
        elif value is None:
            if keyword in ds:
                del ds[keyword]
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()  # written as explicit VR little endian whatever the (possibly false) transfer syntax says
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True, force_encoding=True)
    return buf.getvalue()


def _nifti_with(nii_gz: bytes, changes: dict) -> bytes:
    raw = bytearray(gzip.decompress(nii_gz))
    header = np.frombuffer(bytes(raw[:348]), dtype=nib.Nifti1Header.template_dtype)[0].copy()
    for name, value in changes.items():
        header[name] = value
    raw[:348] = header.tobytes()
    return gzip.compress(bytes(raw), mtime=0)


def byte_mutations(base: bytes) -> st.SearchStrategy[bytes]:
    n = len(base)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: _apply_flips(base, edits))
    truncate = st.integers(0, n - 1).map(lambda k: base[:k])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(
        lambda t: base[:t[0]] + t[1] + base[t[0]:])
    header_noise = st.binary(min_size=1, max_size=48).map(lambda b: base[:8] + b + base[8 + len(b):])
    return st.one_of(flips, truncate, insert, header_noise)


def _apply_flips(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for pos, value in edits:
        out[pos] = value
    return bytes(out)


SIDE = st.one_of(st.sampled_from([0, 1, 31, 32, 227, 228, 16_384, 16_385, 2**31 - 1]), st.integers(0, 2**32 - 1))


def png_structures(png: bytes) -> st.SearchStrategy[bytes]:
    return st.builds(_png_with_ihdr, st.just(png), SIDE, SIDE, st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]),
                     st.sampled_from([0, 2, 3, 4, 6, 1, 7]))


def dicom_structures(dicom: bytes) -> st.SearchStrategy[bytes]:
    small = st.integers(0, 65_535)
    changes = st.fixed_dictionaries({}, optional={
        "Rows": small, "Columns": small, "NumberOfFrames": st.sampled_from(["1", "2", "0", "1000000"]),
        "SamplesPerPixel": st.sampled_from([1, 3, 0]), "BitsAllocated": st.sampled_from([1, 8, 16, 32, 12]),
        "BitsStored": st.sampled_from([1, 8, 12, 16, 40]), "PixelRepresentation": st.sampled_from([0, 1, 2]),
        "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL"]),
        "RescaleSlope": st.sampled_from(["1e308", "-1", "0"]), "WindowWidth": st.sampled_from(["0", "-5", "1e30"]),
        "TransferSyntaxUID": st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                                              "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.3.4"]),
        "SOPClassUID": st.sampled_from(NON_IMAGE_OR_MULTIFRAME),
    })
    return st.builds(_dicom_with, st.just(dicom), changes)


# SR, RT Plan, PDF (no pixels in their IODs); Enhanced MR, SEG, Breast Tomosynthesis (multi-frame); a made-up UID
NON_IMAGE_OR_MULTIFRAME = ["1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.481.5",
                           "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.4.1",
                           "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.13.1.3", "1.2.3.4.5"]
_DECIMALS = st.sampled_from(["0", "-1", "1e308", "1e-30", "2", "0.5", "-7.25"])
SERIES_CHANGES = {
    "Rows": st.integers(0, 65_535), "Columns": st.integers(0, 65_535),
    "NumberOfFrames": st.sampled_from(["2", "0", "1000000"]), "SamplesPerPixel": st.sampled_from([3, 0]),
    "BitsAllocated": st.sampled_from([1, 8, 32, 12]), "PixelRepresentation": st.sampled_from([1, 2]),
    "ImagePositionPatient": st.lists(_DECIMALS, min_size=0, max_size=4),
    "ImageOrientationPatient": st.lists(_DECIMALS, min_size=0, max_size=7),
    "PixelSpacing": st.lists(_DECIMALS, min_size=0, max_size=3),
    "SeriesInstanceUID": st.sampled_from(["1.2.3", "1.2.3.4.5.6.7"]),
    "FrameOfReferenceUID": st.sampled_from(["1.2.3", "1.2.3.4.5.6.7"]),
    "RescaleSlope": st.sampled_from(["1e308", "-1", "0"]),
    "SOPClassUID": st.sampled_from(NON_IMAGE_OR_MULTIFRAME),
    "TransferSyntaxUID": st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.100",
                                          "1.2.840.10008.1.2.5", "1.2.3.4"]),
}


def _series_body(files: list[bytes], edits: list[tuple[int, dict]], drop: list[int], order: list[int],
                 packing: str) -> bytes:
    """A series with some slices rewritten or dropped, in some order, as a zip or a multipart/related body."""
    from medxplain_contract.multipart import encode_related

    merged: dict[int, dict] = {}
    for index, changes in edits:  # one rewrite per file: a rewritten file may not parse again (its syntax lies)
        merged.setdefault(index % len(files), {}).update(changes)
    edited = list(files)
    for index, changes in merged.items():
        edited[index] = _dicom_with(files[index], changes)
    kept = [edited[i % len(files)] for i in order if i % len(files) not in set(drop)]
    if packing == "multipart":
        return encode_related(kept)[0] if kept else b"--x\r\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, data in enumerate(kept):
            zf.writestr(f"series/IM{i:04d}", data)
    return buf.getvalue()


def series_bodies(files: list[bytes]) -> st.SearchStrategy[bytes]:
    """Structurally hostile DICOM series: header fields rewritten, slices dropped, duplicated or reordered."""
    n = len(files)
    changes = st.fixed_dictionaries({}, optional=SERIES_CHANGES)
    return st.builds(_series_body, st.just(files), st.lists(st.tuples(st.integers(0, n - 1), changes), max_size=3),
                     st.lists(st.integers(0, n - 1), max_size=3),
                     st.one_of(st.just(list(range(n))), st.permutations(list(range(n))),
                               st.lists(st.integers(0, n - 1), min_size=1, max_size=n + 2)),
                     st.sampled_from(["zip", "multipart"]))


def nifti_structures(nii_gz: bytes) -> st.SearchStrategy[bytes]:
    dims = st.lists(st.integers(-2, 32_767), min_size=8, max_size=8)
    changes = st.fixed_dictionaries({}, optional={
        "dim": dims, "datatype": st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 511, 768, 2304]),
        "bitpix": st.sampled_from([0, 8, 16, 32, 64]),
        "scl_slope": st.sampled_from([0.0, float("nan"), float("inf"), 1e30, -1.0]),
        "pixdim": st.lists(st.sampled_from([0.0, -1.0, 1e-9, 2.0, float("nan"), 1e9]), min_size=8, max_size=8),
        "vox_offset": st.sampled_from([0.0, 352.0, 1e12, -10.0]),
        "sform_code": st.integers(0, 4), "qform_code": st.integers(0, 4),
    })
    return st.builds(_nifti_with, st.just(nii_gz), changes)


# --- parameters -----------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def param_values(name: str, methods: list[str]) -> st.SearchStrategy:
    """Mostly hostile values; valid ones cheap enough to keep the suite within minutes."""
    valid = {
        "top_k": st.integers(0, 8), "k": st.integers(0, 8), "target": st.sampled_from([0, 1, "0"]),
        "explain": st.one_of(st.sampled_from(methods), st.lists(st.sampled_from(methods), max_size=2),
                             st.just("default")),
        "unit_maps": st.sampled_from([True, False, "true", "no"]), "encoding": st.sampled_from(["png", "float16"]),
        "occlusion_size": st.integers(16, 64), "occlusion_stride": st.integers(24, 64), "ig_steps": st.integers(2, 4),
        "gradcam_layer": st.sampled_from(["layer3", "relu_2", "layer4", "relu_4"]),
    }[name]
    return st.one_of(valid, ANY_JSON)


def params(methods: list[str]) -> st.SearchStrategy[dict]:
    chosen = st.lists(st.sampled_from(PARAM_NAMES), unique=True, max_size=4)
    junk = st.dictionaries(st.text(min_size=1, max_size=12), ANY_JSON, max_size=1)

    @st.composite
    def build(draw) -> dict:
        out = {name: draw(param_values(name, methods)) for name in draw(chosen)}
        if draw(st.integers(0, 9)) == 0:
            out.update(draw(junk))
        return out

    return build()


def as_fields(values: dict) -> st.SearchStrategy[dict]:
    """Multipart / gRPC: each value as text (JSON for non-strings), or raw bytes that may not be UTF-8."""
    def encode(value) -> bytes:
        return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")

    encoded = {k: encode(v) for k, v in values.items()}
    if not encoded:
        return st.just(encoded)
    return st.one_of(st.just(encoded), st.builds(lambda raw, k: {**encoded, k: raw}, st.binary(max_size=16),
                                                 st.sampled_from(sorted(encoded))))


def cases(bodies: st.SearchStrategy[bytes], methods: list[str]) -> st.SearchStrategy[Case]:
    @st.composite
    def build(draw) -> Case:
        body = draw(bodies)
        transport = draw(st.sampled_from(["raw", "multipart", "json", "grpc"]))
        endpoint = draw(st.sampled_from(["predictions", "predictions", "explanations"])) if transport != "grpc" \
            else "predictions"
        if transport == "raw":
            return Case("raw", body, {}, endpoint)
        values = draw(params(methods))
        if transport == "json":
            return Case("json", body, values, endpoint)
        if draw(st.booleans()) and values:  # all parameters in one `params` JSON field
            return Case(transport, body, {"params": json.dumps(values, allow_nan=True).encode()}, endpoint)
        return Case(transport, body, draw(as_fields(values)), endpoint)

    return build()


# --- sending and checking -------------------------------------------------------------------------

def send(server, model: str, case: Case, timeout: float = 300) -> Answer:
    if case.transport == "grpc":
        return _send_grpc(server, model, case, timeout)
    url = f"{server.inference_url}/{case.endpoint}/{model}"
    headers = server.auth_header()
    if case.transport == "raw":
        r = requests.post(url, data=case.body, headers=headers, timeout=timeout)
    elif case.transport == "json":
        payload = {**case.params, "data": base64.b64encode(case.body).decode()}
        r = requests.post(url, data=json.dumps(payload, allow_nan=True), timeout=timeout,
                          headers={**headers, "Content-Type": "application/json"})
    else:
        files = {"data": ("data", case.body), **{k: (None, v) for k, v in case.params.items()}}
        r = requests.post(url, files=files, headers=headers, timeout=timeout)
    return Answer(r.status_code, r.content, r.reason or "")


_CHANNELS: dict[int, tuple[grpc.Channel, object]] = {}


def _send_grpc(server, model: str, case: Case, timeout: float) -> Answer:
    from medxplain_client.stubs import ensure_stubs

    stubs = ensure_stubs()
    if server.grpc_port not in _CHANNELS:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                                        options=[("grpc.max_send_message_length", 128 << 20),
                                                 ("grpc.max_receive_message_length", 128 << 20)])
        _CHANNELS[server.grpc_port] = (channel, stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel))
    stub = _CHANNELS[server.grpc_port][1]
    inputs_map = {"data": case.body, **case.params}
    request = stubs.inference_pb2.PredictionsRequest(model_name=model, input=inputs_map)
    metadata = (("authorization", f"Bearer {server.keys()['inference']}"),)
    try:
        reply = stub.Predictions(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        return Answer(_grpc_status(err.code()), (err.details() or "").encode(), "grpc")
    body = reply.prediction
    try:
        parsed = json.loads(body)
        status = int(parsed.get("code", 200)) if isinstance(parsed, dict) and "error" in parsed else 200
    except (ValueError, TypeError):
        status = 200
    return Answer(status, body, "")


def _grpc_status(code: grpc.StatusCode) -> int:
    return {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503}.get(code, 500)


def _no_nan(raw: bytes):
    def refuse(token: str):
        raise ValueError(f"non-finite number {token} in JSON")

    return json.loads(raw, parse_constant=refuse)


def check_answer(answer: Answer) -> dict:
    """200 with a result, or a 4xx with the error body; strict JSON; short printable-ASCII messages."""
    assert answer.status == 200 or 400 <= answer.status < 500, (answer.status, answer.body[:300])
    if answer.reason == "grpc":  # a gRPC-level refusal: TorchServe's own message
        raise AssertionError(f"gRPC call failed: {answer.body[:300]!r}")
    body = _no_nan(answer.body)
    assert isinstance(body, dict), body
    checked(body, "response" if answer.status == 200 else "error")  # the machine-readable contract
    if answer.status == 200:
        assert "prediction" in body, list(body)
        probs = body["prediction"]["probabilities"].values()
        assert all(p is None or math.isfinite(p) for p in probs)
    else:
        assert body.get("code") == answer.status and isinstance(body.get("error"), str), body
        message = body.get("message")
        assert isinstance(message, str) and 0 < len(message) <= MAX_MESSAGE, message
        assert message.isascii() and message.isprintable(), message
        if answer.reason and answer.reason != "grpc":
            assert len(answer.reason) <= MAX_MESSAGE and answer.reason.isascii(), answer.reason
    return body


def worker_pids(server, model: str) -> list[int]:
    r = requests.get(f"{server.management_url}/models/{model}", headers=server.auth_header("management"), timeout=30)
    r.raise_for_status()
    workers = r.json()[0]["workers"]
    assert workers and all(w["status"] == "READY" for w in workers), workers
    return sorted(int(w["pid"]) for w in workers)


def ddsm_bodies(full_image: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    img8 = (rng.random((300, 260)) * 255).astype(np.uint8)
    return {"png patch": inputs.patch_png(), "png full": full_image, "tiff": inputs.tiff_bytes(img8),
            "dicom": inputs.dicom_bytes((rng.random((300, 260)) * 4000).astype(np.uint16))}
