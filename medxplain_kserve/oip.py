"""Open Inference Protocol <-> request rows: the only KServe-specific translation (docs/api.md, "KServe").

v2 request: the file is the BYTES tensor ``data`` (shape [1]); other BYTES inputs are text parameters,
as multipart fields are on TorchServe; request ``parameters`` are the parameters (any JSON type, typed
by the engine's ``parse_options`` like a JSON body's). v2 response: one BYTES output ``result`` holding
the JSON body TorchServe would send; with ``outputs`` naming ``heatmaps`` (all) or ``heatmap_<method>``,
each such map also comes as a typed tensor: ``float16`` maps as FP16 with the same bytes, ``png`` and
``nifti.gz`` maps decoded to FP32 (true values), shaped as the map. With parameter ``output=dicom`` the
response is instead the one BYTES output ``dicom`` of shape [N]: each element one DICOM Part-10 file, in
the order of TorchServe's multipart parts (what TorchServe sends: the objects, no JSON). v1 ``:predict``:
each instance is a TorchServe JSON body ``{"data": "<base64>", ...parameters}``; v1 answers JSON only.
"""

from __future__ import annotations

import numpy as np

from medxplain_contract.encodings import decode_map, map_bytes
from medxplain_contract.errors import InputError
from medxplain_contract.multipart import DICOM_TYPE, boundary_of, decode_related
from medxplain_engine.rows import PAYLOAD_FIELDS

FILE_INPUT = "data"
RESULT_OUTPUT = "result"
ALL_HEATMAPS = "heatmaps"
HEATMAP_PREFIX = "heatmap_"
DICOM_OUTPUT = "dicom"
DICOM_PARAMETERS = {"content_type": DICOM_TYPE}  # the dicom output's parameters: what its elements are
RESERVED_PARAMETERS = ("binary_data_output", "binary_data", "content_type")  # OIP's own, not ours


def parameter_values(parameters) -> dict:
    """REST gives a dict; gRPC a map of ``InferParameter`` (bool / int64 / string) messages."""
    if not parameters:
        return {}
    out = {}
    for key, value in dict(parameters).items():
        if hasattr(value, "WhichOneof"):
            which = value.WhichOneof("parameter_choice")
            value = getattr(value, which) if which else None
        if key not in RESERVED_PARAMETERS:
            out[key] = value
    return out


def _tensor_bytes(tensor) -> bytes | str:
    """The first element of a BYTES tensor (REST JSON gives str, binary extension and gRPC give bytes)."""
    if tensor.datatype != "BYTES":
        raise InputError("bad_payload", f"input '{FILE_INPUT}' and parameter inputs must be BYTES tensors")
    try:
        values = tensor.as_numpy().reshape(-1)
    except Exception:  # noqa: BLE001 -- kserve raises many types for malformed tensors
        raise InputError("bad_payload", "a BYTES input tensor could not be read") from None
    if values.size != 1:
        raise InputError("bad_payload", "each input tensor must hold one element (shape [1]): one file per request")
    value = values[0]
    if isinstance(value, (bytes, bytearray, str)):
        return value
    raise InputError("bad_payload", "a BYTES input tensor could not be read")


def v2_row(request) -> dict:
    """An OIP ``InferRequest`` -> a row for ``medxplain_engine.rows.parse_row``: input tensors and request
    parameters become the row's fields, as multipart fields do on TorchServe (``params`` = a JSON object)."""
    row: dict = {}
    for tensor in request.inputs or []:
        if not isinstance(tensor.name, str) or tensor.name in row:
            raise InputError("bad_parameter", "input tensor names must be unique text")
        row[tensor.name] = _tensor_bytes(tensor)
    for key, value in parameter_values(request.parameters).items():
        if key in row or key in PAYLOAD_FIELDS:
            raise InputError("bad_parameter", "a request parameter may not repeat an input tensor or name the file")
        row[key] = value
    return row


def requested_heatmaps(request) -> set[str] | None:
    """None: none asked; else the methods asked for (empty set = every heatmap of the answer)."""
    names = [o.name for o in (request.request_outputs or [])]
    if not any(n == ALL_HEATMAPS or n.startswith(HEATMAP_PREFIX) for n in names):
        return None
    if ALL_HEATMAPS in names:
        return set()
    return {n[len(HEATMAP_PREFIX):] for n in names if n.startswith(HEATMAP_PREFIX)}


def heatmap_tensors(result: dict, wanted: set[str]) -> list[tuple[str, np.ndarray]]:
    """(output name, array) of each asked-for heatmap: FP16 bytes as sent in JSON, else decoded FP32."""
    out = []
    for method, entry in sorted((result.get("heatmaps") or {}).items()):
        if wanted and method not in wanted:
            continue
        if entry.get("encoding") == "float16":
            array = np.frombuffer(map_bytes(entry), dtype="<f2").reshape(entry["shape"])
        else:
            array = decode_map(entry).astype("<f4")
        out.append((f"{HEATMAP_PREFIX}{method}", array))
    return out


def dicom_parts(body: bytes, content_type: str) -> list[bytes]:
    """The DICOM files of TorchServe's ``output=dicom`` body (``rows.encode_dicom_row``), in order: splitting
    the very body TorchServe sends keeps the two runtimes' files byte for byte the same."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError("the DICOM answer is not multipart/related")
    return decode_related(body, boundary)


def accepts_dicom(headers: dict[str, str] | None) -> bool:
    """``Accept: multipart/related; type="application/dicom"`` (TorchServe's other way to ask for the objects)."""
    accept = str((headers or {}).get("accept") or "").lower()
    return "multipart/related" in accept and DICOM_TYPE in accept
