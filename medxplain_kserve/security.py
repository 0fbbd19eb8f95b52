"""Bearer-token check and request-size limit for KServe's REST app (ASGI) and gRPC server (interceptor).

KServe's Python server has neither: upstream expects an authenticating ingress (Istio / an
authorization policy) in front. We keep TorchServe's default instead: every inference and metadata
call needs ``Authorization: Bearer <token>``; only the liveness / readiness probes and ``/metrics``
(what TorchServe's unauthenticated ping and metrics port offer) are open. ``--no-auth`` turns it off.
Written as plain ASGI / grpc.aio code because it is a constant-time string compare and a byte count:
no library would make it shorter.
"""

from __future__ import annotations

import hmac
import json

import grpc
from grpc import aio

OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics"})
OPEN_GRPC = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})
UNAUTHORIZED = {"code": 401, "error": "unauthorized",
                "message": "missing or wrong bearer token: send Authorization: Bearer <token>"}


def _error_body(status: int, error: str, message: str) -> bytes:
    return json.dumps({"code": status, "error": error, "message": message}, separators=(",", ":")).encode()


def token_ok(header: str | bytes | None, token: str) -> bool:
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _send_error(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI: refuse a wrong/missing token (401) and bodies over ``max_bytes`` (413) before the app reads them."""

    def __init__(self, app, token: str | None, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and scope.get("path") not in OPEN_PATHS and not token_ok(headers.get(b"authorization"), self.token):
            body = json.dumps(UNAUTHORIZED, separators=(",", ":")).encode()
            return await _send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])
        too_large = _error_body(413, "payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _send_error(send, 400, _error_body(400, "bad_request", "invalid Content-Length"))
        if declared > self.max_bytes:
            return await _send_error(send, 413, too_large)
        received = 0
        over = False

        async def counted_receive():  # a chunked body has no Content-Length: count it as it arrives
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            if not over:  # once over the limit, the app's own (error) answer is replaced by the 413
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await _send_error(send, 413, too_large)


class _TooLarge(Exception):
    pass


class TokenInterceptor(aio.ServerInterceptor):
    """gRPC: ``authorization: Bearer <token>`` metadata on every call but the two health probes."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method in OPEN_GRPC:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if token_ok(metadata.get("authorization"), self.token):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_deny)


async def _deny(request, context: aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, json.dumps(UNAUTHORIZED, separators=(",", ":")))
