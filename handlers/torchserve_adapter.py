"""The only TorchServe-specific code: turn TorchServe's request rows into engine requests and back.

TorchServe hands ``handle`` one dict per request of a dynamic batch. Every row is parsed and
answered on its own (a batch may mix predictions, explanations and bad inputs); an input error
becomes a 4xx ``{code, error, message}`` for that row only and the worker keeps running.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

import torch

from handlers.engine import Engine, EngineRequest
from handlers.errors import InputError

log = logging.getLogger(__name__)
PAYLOAD_FIELDS = ("data", "file", "image", "volume", "body")


def parse_row(row: dict, explain_header: bool = False) -> EngineRequest:
    """Accept a raw body, multipart fields, or a JSON body ``{"data": base64, ...params}``."""
    params: dict = {}
    payload = None
    body = row.get("body")
    if isinstance(body, dict):  # JSON body, already parsed by TorchServe
        params.update({k: v for k, v in body.items() if k != "data"})
        payload = _b64(body.get("data"))
    else:
        for name in PAYLOAD_FIELDS:
            if row.get(name) is not None:
                payload = row[name]
                break
        if isinstance(row.get("params"), (bytes, bytearray, str)):
            params.update(_json_params(row["params"]))
        for key, value in row.items():  # remaining multipart fields / query parameters
            if key not in PAYLOAD_FIELDS and key != "params":
                params[key] = value.decode() if isinstance(value, (bytes, bytearray)) else value
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    if isinstance(payload, bytearray):
        payload = bytes(payload)
    if not isinstance(payload, bytes) or not payload:
        raise InputError("empty_body", "no input file found: send the file as the request body, a multipart "
                         "field named 'data', or JSON {\"data\": <base64>}")
    if explain_header:
        params.setdefault("explain", params.get("explain") or "default")
    return EngineRequest(payload=payload, params=params)


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
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("bad_params", "field 'params' must be a JSON object") from None
    if not isinstance(value, dict):
        raise InputError("bad_params", "field 'params' must be a JSON object")
    return value


class EngineHandler:
    """TorchServe custom handler: ``initialize(context)`` + ``handle(data, context)``."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.initialized = False

    def initialize(self, context) -> None:
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        torch.set_num_threads(int(settings.get("torch_num_threads", 1)))
        self.engine = Engine.from_model_dir(Path(context.system_properties["model_dir"]))
        self.initialized = True
        log.info("loaded %s", self.engine.model_info())

    def handle(self, data: list[dict], context) -> list:
        assert self.engine is not None
        if _is_describe(context):  # management API: GET /models/{name}?customized=true
            return [self.engine.describe()]
        requests: list[EngineRequest | InputError] = []
        for i, row in enumerate(data):
            try:
                requests.append(parse_row(row or {}, _is_explain(context, i)))
            except InputError as err:
                requests.append(err)
        valid = [r for r in requests if isinstance(r, EngineRequest)]
        results = iter(self.engine.run(valid))
        out = []
        for i, req in enumerate(requests):
            result = req if isinstance(req, InputError) else next(results)
            if isinstance(result, InputError):
                context.set_response_status(result.status, result.message, idx=i)
                log.info("request %d rejected: %s", i, result.code)  # the code only: never input content
                result = result.to_dict()
            out.append(result)
        return out


def _is_describe(context) -> bool:
    try:
        return str(context.get_request_header(0, "describe")) == "True"
    except (AttributeError, KeyError, IndexError, TypeError):
        return False


def _is_explain(context, idx: int) -> bool:
    try:
        return str(context.get_request_header(idx, "explain")).lower() == "true"
    except (AttributeError, KeyError, IndexError, TypeError):
        return False
