"""One request to TorchServe over REST or gRPC, or to the KServe runtime over OIP v2 REST or gRPC; each
returns the response dict (or, for ``output=dicom``, the DICOM files) or raises ClientError.

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


# --- Open Inference Protocol v2 (the KServe runtime, medxplain_kserve; docs/api.md "KServe") -----------------

def _length_prefixed(payload: bytes) -> bytes:
    """One BYTES element in OIP's raw form: a 4-byte little-endian length, then the bytes."""
    return len(payload).to_bytes(4, "little") + payload


def _unprefixed(raw: bytes) -> bytes:
    if len(raw) < 4 or int.from_bytes(raw[:4], "little") != len(raw) - 4:
        raise ClientError(502, "bad_response", "the server's BYTES output is malformed")
    return raw[4:]


def _elements(raw: bytes, count: int) -> list[bytes]:
    """A BYTES tensor's ``count`` elements from OIP's raw form (each a 4-byte little-endian length + bytes).
    By hand: the only library with this (kserve / tritonclient) would pull a server stack into the client."""
    out, offset = [], 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset:offset + 4], "little")
        if offset + 4 > len(raw) or offset + 4 + size > len(raw):
            break
        out.append(raw[offset + 4:offset + 4 + size])
        offset += 4 + size
    if offset != len(raw) or len(out) != count:
        raise ClientError(502, "bad_response", "the server's BYTES output is malformed")
    return out


def _dicom_files(spec: dict, raw: bytes) -> list[bytes]:
    """The DICOM files of the ``dicom`` output: BYTES [N], content type application/dicom, N files."""
    shape = list(spec.get("shape") or [])
    if spec.get("datatype") != "BYTES" or len(shape) != 1 or spec.get("content_type") != DICOM_TYPE:
        raise ClientError(502, "bad_response", "the server's 'dicom' output is not BYTES [N] of application/dicom")
    return _elements(raw, int(shape[0]))


class OipRestTransport:
    """``POST /v2/models/{model}/infer``: the file as the BYTES input ``data`` in the binary-data extension,
    parameters as request ``parameters``; the answer is the JSON in the BYTES output ``result`` (or with
    ``output=dicom`` the DICOM files, the elements of the BYTES output ``dicom``)."""

    HEADER = "Inference-Header-Content-Length"

    def __init__(self, base_url: str, token: str | None, timeout: float) -> None:
        self.rest = RestTransport(base_url, token, timeout)  # its session, auth header and connection errors

    def send(self, model: str, payload: bytes, filename: str, fields: dict[str, str], explain: bool) -> dict:
        r = self._infer(model, payload, fields, explain, "result")
        spec, raw = _oip_output(r, "result")
        if "binary_data_size" not in (spec.get("parameters") or {}):
            data = spec.get("data") or [None]
            return _checked(_json(data[0].encode() if isinstance(data[0], str) else b""))
        return _checked(_json(_unprefixed(raw)))

    def send_for_dicom(self, model: str, payload: bytes, filename: str, fields: dict[str, str],
                       explain: bool) -> list[bytes]:
        """``output=dicom``: the DICOM files, in the order TorchServe's multipart answer has them."""
        r = self._infer(model, payload, {**fields, "output": "dicom"}, explain, "dicom")
        spec, raw = _oip_output(r, "dicom")
        return _dicom_files({**spec, "content_type": (spec.get("parameters") or {}).get("content_type")}, raw)

    def _infer(self, model: str, payload: bytes, fields: dict[str, str], explain: bool, output: str) -> requests.Response:
        params = dict(fields)
        if explain:
            params.setdefault("explain", "default")
        element = _length_prefixed(payload)
        header = json.dumps({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(element)}}],
                             "parameters": params, "outputs": [{"name": output}]}).encode()
        url = f"{self.rest.base_url}/v2/models/{quote(model, safe='')}/infer"
        try:
            r = self.rest.session.post(url, data=header + element, timeout=self.rest.timeout,
                                       headers={self.HEADER: str(len(header)), "Content-Type": "application/octet-stream"})
        except requests.ConnectionError as err:
            reason = getattr(err.args[0], "reason", err) if err.args else err
            raise ConnectionFailed(f"cannot reach {self.rest.base_url}: {reason}") from None
        except requests.Timeout:
            raise ClientError(504, "timeout", f"no answer from {self.rest.base_url} within {self.rest.timeout:g}s") from None
        if r.status_code >= 400:
            raise _rest_error(r.status_code, _json(r.content), r.reason or "", r.text)
        return r

    def close(self) -> None:
        self.rest.close()


def _oip_output(r: requests.Response, name: str) -> tuple[dict, bytes]:
    """(the output's JSON spec, its binary-extension bytes or b"") of a v2 REST answer, JSON-only or binary form."""
    size = r.headers.get(OipRestTransport.HEADER)
    try:
        n = int(size) if size else len(r.content)
    except ValueError:
        n = -1
    body = _json(r.content[:n]) if 0 <= n <= len(r.content) else None
    outputs = body.get("outputs") if isinstance(body, dict) else None
    offset = n
    for out in outputs if isinstance(outputs, list) else []:
        params = out.get("parameters") if isinstance(out, dict) else None
        raw_size = params.get("binary_data_size") if isinstance(params, dict) else None
        if raw_size is not None and (not isinstance(raw_size, int) or raw_size < 0):
            break
        if out.get("name") == name:
            if raw_size is not None and offset + raw_size > len(r.content):
                break
            return out, r.content[offset:offset + raw_size] if raw_size is not None else b""
        offset += raw_size or 0
    raise ClientError(502, "bad_response", f"the server's answer has no well-formed '{name}' output")


class OipGrpcTransport:
    """``GRPCInferenceService.ModelInfer`` with the file in ``raw_input_contents``; a refused request is a
    gRPC status whose details are the ``{code, error, message}`` JSON."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        from medxplain_client.stubs import ensure_stubs

        stubs = ensure_stubs()
        self.pb = stubs.open_inference_grpc_pb2
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                              ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = stubs.open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def request(self, model: str, payload: bytes, fields: dict[str, str], explain: bool, outputs: tuple[str, ...] = ()):
        pb = self.pb
        params = dict(fields)
        if explain:
            params.setdefault("explain", "default")
        return pb.ModelInferRequest(
            model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(name="data", datatype="BYTES", shape=[1])],
            raw_input_contents=[_length_prefixed(payload)],
            parameters={k: pb.InferParameter(string_param=v) for k, v in params.items()},
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])

    def infer(self, request):
        try:
            return self.stub.ModelInfer(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise _oip_grpc_error(err) from None

    def send(self, model: str, payload: bytes, filename: str, fields: dict[str, str], explain: bool) -> dict:
        reply = self.infer(self.request(model, payload, fields, explain))
        return _checked(_json(_unprefixed(self._raw_output(reply, "result")[1])))

    def send_for_dicom(self, model: str, payload: bytes, filename: str, fields: dict[str, str],
                       explain: bool) -> list[bytes]:
        """``output=dicom``: the DICOM files of the ``dicom`` output's raw contents, in TorchServe's order."""
        reply = self.infer(self.request(model, payload, {**fields, "output": "dicom"}, explain, ("dicom",)))
        out, raw = self._raw_output(reply, "dicom")
        content_type = out.parameters["content_type"].string_param if "content_type" in out.parameters else None
        return _dicom_files({"datatype": out.datatype, "shape": list(out.shape), "content_type": content_type}, raw)

    @staticmethod
    def _raw_output(reply, name: str):
        for i, out in enumerate(reply.outputs):
            if out.name == name and i < len(reply.raw_output_contents):
                return out, reply.raw_output_contents[i]
        raise ClientError(502, "bad_response", f"the server's answer has no '{name}' output in raw contents")

    def close(self) -> None:
        self.channel.close()


def _oip_grpc_error(err: grpc.RpcError) -> ClientError:
    """Our refusals carry the REST error body as details; other statuses (KServe's own) map as TorchServe's."""
    code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
    body = _json(details.encode())
    if isinstance(body, dict) and isinstance(body.get("code"), int) and "message" in body:
        return ClientError(body["code"], str(body.get("error") or code.name.lower()), str(body["message"]))
    return ClientError(GRPC_TO_HTTP.get(code, 500), code.name.lower(), details[:200])
