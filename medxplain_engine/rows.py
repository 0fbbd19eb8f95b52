"""Runtime-neutral request rows: read one request into an ``EngineRequest``, encode one answer.

Both serving adapters (TorchServe's ``handlers/torchserve_adapter.py`` and KServe's
``medxplain_kserve/``) call these, so a file and its parameters mean the same on either runtime and
the JSON body (or ``{code, error, message}``) is byte for byte the same. A row is a dict of fields:
``body`` (raw bytes, or an already parsed JSON object), or named fields (multipart / gRPC inputs)
with the file in one of :data:`PAYLOAD_FIELDS` and the parameters in the others or in ``params``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging

from medxplain_contract.errors import InputError, as_row_error
from medxplain_contract.multipart import encode_related
from medxplain_engine.budget import Budget
from medxplain_engine.engine import DicomObjects, Engine, EngineRequest

PAYLOAD_FIELDS = ("data", "file", "image", "volume", "body")


def parse_row(row: dict, explain_header: bool = False) -> EngineRequest:
    """Accept a raw body, multipart fields / gRPC inputs, or a JSON body ``{"data": base64, ...params}``.

    Any JSON type may arrive in any field; parameters are only collected here and typed by
    ``parse_options``. Text must be UTF-8; the file itself is bytes and is not decoded here.
    """
    if not isinstance(row, dict):
        raise InputError("bad_request", "the request could not be read")
    params: dict = {}
    payload = None
    body = row.get("body")
    if isinstance(body, dict):  # JSON body, already parsed by TorchServe
        params.update({k: v for k, v in body.items() if k not in ("data", "params")})
        if "params" in body:
            params.update(_json_params(body["params"]))
        payload = _b64(body.get("data"))
    elif body is not None and not isinstance(body, (bytes, bytearray, str)):
        raise InputError("bad_json_body", 'a JSON body must be an object {"data": "<base64 file>", ...parameters}')
    else:
        for name in PAYLOAD_FIELDS:
            if row.get(name) is not None:
                payload = row[name]
                break
        if row.get("params") is not None:
            params.update(_json_params(row["params"]))
        for key, value in row.items():  # remaining multipart fields / gRPC inputs
            if key not in PAYLOAD_FIELDS and key != "params":
                params[key] = _text(value, key) if isinstance(value, (bytes, bytearray)) else value
    if isinstance(payload, str):
        payload = payload.encode("utf-8")  # TorchServe decoded a text/* body as UTF-8: restore its bytes
    if isinstance(payload, bytearray):
        payload = bytes(payload)
    if isinstance(payload, (dict, list, int, float)) and not isinstance(payload, bool):
        raise InputError("bad_payload", "the file must be sent as bytes (a raw body or multipart field 'data'), "
                         "or base64 in a JSON body")
    if not isinstance(payload, bytes) or not payload:
        raise InputError("empty_body", "no input file found: send the file as the request body, a multipart "
                         "field named 'data', or JSON {\"data\": <base64>}")
    if explain_header:
        params.setdefault("explain", params.get("explain") or "default")
    return EngineRequest(payload=payload, params=params)


def _text(value: bytes | bytearray, field: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("bad_parameter", "parameter values must be UTF-8 text") from None


def _b64(value) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError("bad_payload", "JSON field 'data' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("bad_payload", "JSON field 'data' is not valid base64") from None


def _json_params(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise InputError("bad_params", "field 'params' must be a JSON object") from None
    if not isinstance(value, dict):
        raise InputError("bad_params", "field 'params' must be a JSON object")
    return value


def encode_row(result: dict | InputError) -> bytes:
    """Strict JSON (no NaN: ``finite_json`` ran before), compact: TorchServe's own dump indents."""
    body = result.to_dict() if isinstance(result, InputError) else result
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")


def encode_dicom_row(result: DicomObjects) -> tuple[bytes, str]:
    """``output=dicom``: the derived objects as DICOM files in one ``multipart/related; type="application/dicom"``
    body (what a STOW-RS request carries, so a client can forward it to its PACS unchanged)."""
    parts = []
    for ds in result.datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        parts.append(buffer.getvalue())
    return encode_related(parts)


def answer_rows(engine: Engine, requests: list[EngineRequest | InputError]) -> list[dict | DicomObjects | InputError]:
    """One engine call for the valid rows of a batch; rows refused while parsing keep their error, in order."""
    valid = [r for r in requests if isinstance(r, EngineRequest)]
    results = iter(engine.run(valid) if valid else [])
    return [req if isinstance(req, InputError) else next(results) for req in requests]


def encode_answer(result: dict | DicomObjects | InputError, budget: Budget | None,
                  log: logging.Logger) -> tuple[bytes, str, dict | DicomObjects | InputError]:
    """(body, content type, result): an encoding failure or an answer over the response budget becomes that
    row's error, so the returned result says what was actually sent."""
    try:
        if isinstance(result, DicomObjects):
            body, content_type = encode_dicom_row(result)
        else:
            body, content_type = encode_row(result), "application/json"
        if not isinstance(result, InputError) and budget is not None:
            budget.check_encoded(len(body))
        return body, content_type, result
    except Exception as err:  # noqa: BLE001 -- isolated to its row (medxplain_contract.errors.as_row_error)
        error = as_row_error(err, "encode", log)
        return encode_row(error), "application/json", error
