"""Senders for the KServe runtime's tests: one request case as OIP v2 (REST binary / gRPC) or v1 JSON."""

from __future__ import annotations

import json

import grpc
import requests

from medxplain_client.transports import OipGrpcTransport
from tests import hostile


def v2_rest(server, model: str, body: bytes, params: dict | None = None, text_inputs: dict | None = None,
            outputs: tuple[str, ...] = (), token: str | None = None) -> requests.Response:
    """The file as BYTES input ``data`` (binary extension), ``params`` as request parameters, ``text_inputs``
    as further BYTES inputs (how bytes-valued multipart fields travel)."""
    inputs, raw = [], b""
    for name, value in {"data": body, **(text_inputs or {})}.items():
        element = len(value).to_bytes(4, "little") + value
        inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}})
        raw += element
    header = json.dumps({"inputs": inputs, "parameters": params or {},
                         "outputs": [{"name": n} for n in ("result", *outputs)]}).encode()
    headers = server.auth_header() if token is None else {"Authorization": f"Bearer {token}"}
    headers.update({"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    return requests.post(f"{server.inference_url}/v2/models/{model}/infer", data=header + raw, headers=headers,
                         timeout=300)


def v1_rest(server, model: str, instance) -> requests.Response:
    return requests.post(f"{server.inference_url}/v1/models/{model}:predict", json={"instances": [instance]},
                         headers=server.auth_header(), timeout=300)


def grpc_transport(server, token: str | None = None) -> OipGrpcTransport:
    return OipGrpcTransport(server.grpc_target, server.token() if token is None else token, 300)


def grpc_answer(transport: OipGrpcTransport, model: str, body: bytes, params: dict) -> hostile.Answer:
    """A gRPC call as an Answer: our refusals are statuses whose details hold the error body."""
    pb = transport.pb
    request = transport.request(model, body, {}, False)
    for key, value in params.items():
        if isinstance(value, bytes):  # bytes travel as a BYTES input, as multipart fields do on TorchServe
            request.inputs.append(pb.ModelInferRequest.InferInputTensor(name=key, datatype="BYTES", shape=[1]))
            request.raw_input_contents.append(len(value).to_bytes(4, "little") + value)
        else:
            request.parameters[key].string_param = value
    try:
        reply = transport.stub.ModelInfer(request, timeout=300, metadata=transport.metadata)
    except grpc.RpcError as err:
        details = (err.details() or "").encode()
        try:
            status = json.loads(details)["code"]
        except (ValueError, KeyError, TypeError):
            return hostile.Answer(599, details, "grpc")
        return hostile.Answer(status, details)
    return hostile.Answer(200, reply.raw_output_contents[0][4:])


def v2_result(r: requests.Response) -> dict:
    """The JSON of the ``result`` output (JSON answer, or binary extension when tensors were asked for)."""
    if "Inference-Header-Content-Length" not in r.headers:
        out = r.json()["outputs"][0]
        assert out["name"] == "result" and out["datatype"] == "BYTES"
        return json.loads(out["data"][0])
    n = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:n])
    out = header["outputs"][0]
    assert out["name"] == "result"
    size = out["parameters"]["binary_data_size"]
    return json.loads(r.content[n + 4:n + size])


def v2_tensors(r: requests.Response) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (datatype, shape, raw bytes) of every output of a binary-extension answer."""
    n = int(r.headers["Inference-Header-Content-Length"])
    offset, out = n, {}
    for spec in json.loads(r.content[:n])["outputs"]:
        size = spec["parameters"]["binary_data_size"]
        out[spec["name"]] = (spec["datatype"], spec["shape"], r.content[offset:offset + size])
        offset += size
    return out
