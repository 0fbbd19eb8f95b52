"""KServe's ``ModelServer`` bound to loopback (or a given address), with our guards added.

``ModelServer.start`` builds its REST and gRPC servers on 0.0.0.0 / [::] with fixed interceptors,
so :class:`GuardedModelServer` builds the same two servers itself (KServe's own ``RESTServer``,
data plane, servicer and exception interceptor) on ``host`` and adds the token check, the size limit
and our error bodies. Everything else (routes, metrics, OIP semantics) is KServe's.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent import futures

from fastapi import Request
from fastapi.responses import Response
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as fastapi_app
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from medxplain_kserve import rest_v2
from medxplain_kserve.model import EngineModel, RowError
from medxplain_kserve.security import GuardMiddleware, TokenInterceptor

log = logging.getLogger(__name__)


async def _row_error(request: Request, err: RowError) -> Response:
    """The same status and ``{code, error, message}`` body TorchServe answers for this input."""
    return Response(err.body, status_code=err.status, media_type="application/json")


class GuardedModelServer(ModelServer):
    def __init__(self, host: str, http_port: int, grpc_port: int, token: str | None, max_request_bytes: int) -> None:
        super().__init__(http_port=http_port, grpc_port=grpc_port, enable_grpc=True, enable_docs_url=False,
                         workers=1)
        self.host = host
        self.token = token
        self.max_request_bytes = max_request_bytes
        self._grpc = None

    def start(self, models: list[EngineModel]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        fastapi_app.add_middleware(GuardMiddleware, token=self.token, max_bytes=self.max_request_bytes)
        fastapi_app.add_exception_handler(RowError, _row_error)
        rest_v2.register(fastapi_app, self.dataplane)  # before KServe's routes, so it takes /v2/.../infer
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, workers=1, grace_period=self.grace_period,
                                       event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.servers.append(self._serve_grpc())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    async def _serve_grpc(self) -> None:
        interceptors = [ExceptionToStatusInterceptor()]
        if self.token:
            interceptors.insert(0, TokenInterceptor(self.token))
        limit = self.max_request_bytes
        self._grpc = aio.server(futures.ThreadPoolExecutor(max_workers=self.max_threads), interceptors=interceptors,
                                options=[("grpc.max_receive_message_length", limit),
                                         ("grpc.max_send_message_length", limit)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.model_repository_extension), self._grpc)
        self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
        await self._grpc.start()
        log.info("gRPC (OIP v2) on %s:%d, REST on %s:%d, token auth %s", self.host, self.grpc_port, self.host,
                 self.http_port, "on" if self.token else "OFF")
        await self._grpc.wait_for_termination()

    def stop(self, sig: int) -> None:
        if self._rest_server is not None:
            self._rest_server._server.should_exit = True
        if self._grpc is not None:
            asyncio.get_event_loop().create_task(self._grpc.stop(grace=5))
        for model in self.registered_models.get_models().values():
            if hasattr(model, "stop"):
                model.stop()
