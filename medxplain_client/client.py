"""``Client``: predictions and explanations from a MedXplain server (TorchServe, or KServe over OIP v2), with auth and retries.

Only "nothing happened" failures are retried (HTTP 503 / gRPC UNAVAILABLE, refused connections):
a 4xx will fail the same way again, and a timed-out inference may still be running on the server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from medxplain_client.errors import ClientError
from medxplain_client.transports import GrpcTransport, OipGrpcTransport, OipRestTransport, RestTransport

TOKEN_ENV = "MEDXPLAIN_TOKEN"
# rest / grpc: TorchServe's APIs; oip-rest / oip-grpc: Open Inference Protocol v2 (the KServe runtime)
TRANSPORTS = {"rest": RestTransport, "grpc": GrpcTransport, "oip-rest": OipRestTransport, "oip-grpc": OipGrpcTransport}


def read_token(key_file: str | Path) -> str:
    """The inference key from TorchServe's ``key_file.json`` (``{"inference": {"key": ...}, ...}``), or the
    token of a one-line token file (the KServe runtime's ``--token-file``)."""
    try:
        text = Path(key_file).read_text()
    except OSError as err:
        raise ValueError(f"cannot read an inference key from {key_file}: {err!r}") from None
    try:
        return json.loads(text)["inference"]["key"]
    except (ValueError, KeyError, TypeError):
        token = text.strip()
        if token and "\n" not in token and not token.startswith("{"):
            return token
        raise ValueError(f"cannot read an inference key from {key_file}: neither a key_file.json nor a token") from None


class Client:
    """A connection to one server; reuse it for many requests (it keeps the HTTP session / gRPC channel)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", grpc_target: str | None = None,
                 token: str | None = None, key_file: str | Path | None = None, timeout: float = 120.0,
                 retries: int = 3, transport: str = "rest", backoff: float = 0.5) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if transport in ("grpc", "oip-grpc") and not grpc_target:
            raise ValueError(f"transport={transport!r} needs grpc_target='host:port' (the server's gRPC port)")
        token = token or os.environ.get(TOKEN_ENV) or (read_token(key_file) if key_file else None)
        self.retries = retries
        self.backoff = backoff  # seconds before the first retry; doubled for each further one
        target = grpc_target if transport in ("grpc", "oip-grpc") else base_url
        self.transport = TRANSPORTS[transport](target, token, timeout)

    def predict(self, model: str, path_or_bytes: str | Path | bytes, **params) -> dict:
        """Prediction, ranked units and any heatmaps the params ask for (``explain=...``)."""
        return self._send(model, path_or_bytes, params, explain=False)

    def explain(self, model: str, path_or_bytes: str | Path | bytes, methods: Iterable[str] | str | None = None,
                **params) -> dict:
        """Prediction plus heatmaps; ``methods=None`` asks for the model's default methods."""
        if methods is not None:
            params["explain"] = methods
        return self._send(model, path_or_bytes, params, explain=True)

    def dicom(self, model: str, path_or_bytes: str | Path | bytes, methods: Iterable[str] | str | None = None,
              **params) -> list[bytes]:
        """The derived DICOM files of a DICOM input (``output=dicom``): a TID 1500 SR, and per method in ``methods``
        a float Parametric Map and an RGB overlay; what a STOW-RS request carries. TorchServe's REST API
        (multipart/related) or the KServe runtime's OIP v2 (``oip-rest`` / ``oip-grpc``: the output ``dicom``)."""
        if isinstance(self.transport, GrpcTransport):
            raise TypeError("TorchServe's gRPC API answers JSON only: use transport='rest' (or 'oip-*' on KServe)")
        if methods is not None:
            params["explain"] = methods
        return self._send(model, path_or_bytes, params, explain=False, dicom=True)

    def _send(self, model: str, path_or_bytes: str | Path | bytes, params: dict, explain: bool, dicom: bool = False):
        if isinstance(path_or_bytes, bytes):
            payload, filename = path_or_bytes, "input"
        else:
            payload, filename = Path(path_or_bytes).read_bytes(), Path(path_or_bytes).name
        fields = {name: _field(value) for name, value in params.items() if value is not None}
        attempt = 0
        while True:
            attempt += 1
            try:
                if dicom:
                    return self.transport.send_for_dicom(model, payload, filename, fields, explain)  # type: ignore[union-attr]
                return self.transport.send(model, payload, filename, fields, explain)
            except ClientError as err:
                err.attempts = attempt
                if not err.retryable or attempt > self.retries:
                    raise
            time.sleep(self.backoff * 2 ** (attempt - 1))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _field(value) -> str:
    """The handler's text form: lists as comma lists (its ``explain`` syntax), booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)
