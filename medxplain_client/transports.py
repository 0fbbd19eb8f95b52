"""One request to TorchServe over REST or gRPC; both return the response dict or raise ClientError.

Parameters travel as text fields on both (multipart fields / entries of the gRPC input map), which
the handler reads the same way. gRPC has no explanations call, so ``explain`` goes in the map.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import grpc
import requests

from medxplain_client.errors import ClientError, ConnectionFailed
from medxplain_contract.errors import InputError
from medxplain_contract.multipart import DICOM_TYPE, boundary_of, decode_related

DICOM_ACCEPT = f'multipart/related; type="{DICOM_TYPE}"'
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # max_request_size / max_response_size in docker/serve/config.properties

# The inverse of TorchServe's GRPCUtils.getGRPCStatusCode (HTTP status -> gRPC status).
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# TorchServe reports a missing model over gRPC as INTERNAL; the exception class in the details says 404.
TS_EXCEPTIONS = {"ModelNotFoundException": 404, "ModelVersionNotFoundException": 404}


class RestTransport:
    """``POST /predictions/{model}`` or ``/explanations/{model}`` with a multipart ``data`` field."""

    def __init__(self, base_url: str, token: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def send(self, model: str, payload: bytes, filename: str, fields: dict[str, str], explain: bool) -> dict:
        r = self._post(model, payload, filename, fields, explain, {})
        body = _json(r.content)
        if r.status_code >= 400:
            raise _rest_error(r.status_code, body, r.reason or "", r.text)
        return _checked(body)

    def send_for_dicom(self, model: str, payload: bytes, filename: str, fields: dict[str, str],
                       explain: bool) -> list[bytes]:
        """``output=dicom``: the derived DICOM files of the ``multipart/related`` answer, in order."""
        r = self._post(model, payload, filename, {**fields, "output": "dicom"}, explain, {"Accept": DICOM_ACCEPT})
        if r.status_code >= 400:
            raise _rest_error(r.status_code, _json(r.content), r.reason or "", r.text)
        boundary = boundary_of(r.headers.get("Content-Type", ""))
        if boundary is None:
            raise ClientError(502, "bad_response", "the server did not answer with multipart/related DICOM")
        try:
            return decode_related(r.content, boundary)
        except InputError as err:
            raise ClientError(502, "bad_response", f"the server's multipart answer is malformed: {err.message}") from None

    def _post(self, model: str, payload: bytes, filename: str, fields: dict[str, str], explain: bool,
              headers: dict[str, str]) -> requests.Response:
        url = f"{self.base_url}/{'explanations' if explain else 'predictions'}/{quote(model, safe='')}"
        try:
            return self.session.post(url, files={"data": (filename, payload, "application/octet-stream")},
                                     data=fields, headers=headers, timeout=self.timeout)
        except requests.ConnectionError as err:  # includes connect timeouts: nothing was processed
            reason = getattr(err.args[0], "reason", err) if err.args else err  # urllib3's cause, not its retry text
            raise ConnectionFailed(f"cannot reach {self.base_url}: {reason}") from None
        except requests.Timeout:
            raise ClientError(504, "timeout", f"no answer from {self.base_url} within {self.timeout:g}s") from None

    def close(self) -> None:
        self.session.close()


class GrpcTransport:
    """``InferenceAPIsService.Predictions`` with the file as ``input["data"]``."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        from medxplain_client.stubs import ensure_stubs  # here, so `python -m medxplain_client.stubs` runs it once

        stubs = ensure_stubs()
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                              ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.request_type = stubs.inference_pb2.PredictionsRequest

    def send(self, model: str, payload: bytes, filename: str, fields: dict[str, str], explain: bool) -> dict:
        inputs = {"data": payload, **{k: v.encode() for k, v in fields.items()}}
        if explain:
            inputs.setdefault("explain", b"default")
        request = self.request_type(model_name=model, input=inputs)
        try:
            reply = self.stub.Predictions(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise _grpc_error(err) from None
        return _checked(_json(reply.prediction))

    def close(self) -> None:
        self.channel.close()


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _rest_error(status: int, body, default_error: str, default_message: str) -> ClientError:
    """Prefer the server's ``{code, error, message}`` (TorchServe's own errors say ``type``)."""
    if isinstance(body, dict) and "message" in body:
        return ClientError(status, str(body.get("error") or body.get("type") or default_error), str(body["message"]))
    return ClientError(status, default_error, default_message.strip() or f"HTTP {status}")


def _grpc_error(err: grpc.RpcError) -> ClientError:
    """TorchServe puts "message\\njava.exception.Class" in the details; the class tells a missing model (sent
    as INTERNAL) from a server fault, and is the ``type`` its REST API reports for the same error."""
    code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
    message, _, exception = details.partition("\n")
    name = exception.strip().rpartition(".")[2]
    status = TS_EXCEPTIONS.get(name) or GRPC_TO_HTTP.get(code, 500)
    return ClientError(status, name or code.name.lower(), message)


def _checked(body) -> dict:
    """A 2xx must carry a response dict; over gRPC a handler's per-row 4xx arrives as a normal reply."""
    if not isinstance(body, dict):
        raise ClientError(502, "bad_response", "the server's answer is not a JSON object")
    code = body.get("code")
    if isinstance(code, int) and code >= 400 and "error" in body and "message" in body:
        raise ClientError(code, str(body["error"]), str(body["message"]))
    return body
