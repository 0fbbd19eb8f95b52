"""``POST /v2/models/{name}/infer`` in front of KServe's own route, for files in the binary extension.

KServe 0.21 decodes a BYTES tensor of the binary-data extension (``Inference-Header-Content-Length``)
as UTF-8 text, so it answers a PNG with a 500 whose message (and log line) quotes the file's bytes.
This route splits the body itself (JSON header, then each input's ``binary_data_size`` bytes) into
KServe's ``InferRequest`` with raw inputs (the form its gRPC path builds, which keeps bytes as bytes)
and hands it to KServe's data plane; a JSON-only body goes through KServe's own decoding. Responses
are encoded by KServe (``DataPlane.encode``), binary outputs included.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import Response
from kserve.errors import ModelNotReady
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError

from medxplain_contract.errors import InputError
from medxplain_kserve.model import RowError

HEADER_LENGTH = "inference-header-content-length"


def _bad(message: str) -> RowError:
    return RowError(InputError("bad_request", message))


def binary_request(raw: bytes, header_length: str, model_name: str) -> InferRequest:
    try:
        n = int(header_length)
        header = json.loads(raw[:n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("the binary request's JSON header is not readable JSON of the declared length") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise _bad('the JSON header must be an object with an "inputs" list')
    offset, inputs, chunks = n, [], []
    for spec in header["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("each input needs a name, datatype and shape")
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        try:
            tensor = InferInput(spec["name"], list(spec.get("shape") or [1]), str(spec.get("datatype", "")),
                                spec.get("data"), {k: v for k, v in params.items() if k != "binary_data_size"})
        except Exception:  # noqa: BLE001 -- kserve raises many types for malformed tensors
            raise _bad("an input tensor is malformed") from None
        if size is None:
            if "data" not in spec:
                raise _bad("an input has neither data nor binary_data_size")
            inputs.append(tensor)
            chunks.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(raw):
            raise _bad("binary_data_size does not match the bytes sent")
        inputs.append(tensor)
        chunks.append(raw[offset:offset + size])
        offset += size
    if offset != len(raw):
        raise _bad("the body holds more bytes than the inputs declare")
    request = InferRequest(model_name, inputs, request_id=header.get("id"), parameters=header.get("parameters"),
                           request_outputs=[RequestedOutput(o.get("name"), o.get("parameters"))
                                            for o in header.get("outputs") or [] if isinstance(o, dict)])
    for tensor, chunk in zip(inputs, chunks, strict=True):
        if chunk is not None:
            tensor._raw_data = chunk  # kserve's own field for raw (gRPC) contents: as_numpy splits BYTES from it
    return request


def register(app, dataplane) -> None:
    @app.post("/v2/models/{model_name}/infer", include_in_schema=False)
    async def infer(request: Request, model_name: str) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        raw = await request.body()
        headers = dict(request.headers)
        if headers.get(HEADER_LENGTH) is not None:
            infer_request = binary_request(raw, headers[HEADER_LENGTH], model_name)
        else:
            try:
                body = InferenceRequest.model_validate_json(raw)
            except ValidationError:
                raise _bad("the body is not an OIP v2 inference request (JSON)") from None
            infer_request, _ = dataplane.decode(body, headers, protocol_version="v2", model_name=model_name)
        response, response_headers = await dataplane.infer(model_name=model_name, request=infer_request,
                                                           headers=headers)
        response, extra = dataplane.encode(model_name=model_name, response=response, headers=headers,
                                           req_attributes={})
        out_headers = {k: v for k, v in {**response_headers, **extra}.items()
                       if k.lower() not in ("content-length", "content-type")}
        if isinstance(response, bytes):
            return Response(response, media_type="application/octet-stream", headers=out_headers)
        return Response(json.dumps(response, separators=(",", ":"), allow_nan=False), media_type="application/json",
                        headers=out_headers)
