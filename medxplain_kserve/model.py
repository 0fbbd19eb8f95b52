"""``EngineModel``: one archive's engine behind ``kserve.Model``, as thin as the TorchServe adapter.

Rows are parsed, answered and encoded by the same functions TorchServe's adapter calls
(``medxplain_engine.rows``), so both runtimes return the same bytes (the JSON body, or with
``output=dicom`` the same DICOM files, as the elements of the v2 output ``dicom``). An input error leaves as
:class:`RowError`: a 4xx ``{code, error, message}`` on REST, the same JSON as the details of a gRPC
status on gRPC (``GRPC_STATUS``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve import Model
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from batch.archive import LoadedArchive, load_archive
from medxplain_contract.errors import InputError, as_row_error
from medxplain_engine.budget import Budget
from medxplain_engine.engine import DicomObjects, EngineRequest
from medxplain_engine.rows import answer_rows, encode_answer, encode_row, parse_row
from medxplain_engine.served import served_config
from medxplain_engine.version import engine_record
from medxplain_kserve import oip
from medxplain_kserve.batcher import Batcher

log = logging.getLogger(__name__)

# HTTP status of a row error -> gRPC status (TorchServe's GRPCUtils mapping; the client inverts it)
GRPC_STATUS = {400: StatusCode.INVALID_ARGUMENT, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
               404: StatusCode.NOT_FOUND, 413: StatusCode.RESOURCE_EXHAUSTED, 415: StatusCode.INVALID_ARGUMENT,
               422: StatusCode.INVALID_ARGUMENT, 500: StatusCode.INTERNAL, 503: StatusCode.UNAVAILABLE}


Answer = dict | DicomObjects | InputError


def _no_dicom_on_v1(request: EngineRequest) -> InputError | None:
    """v1 ``:predict`` answers are JSON ``predictions``: DICOM files there would be base64 strings in a second,
    ad-hoc response shape; v2 carries them as bytes (binary extension / gRPC raw contents)."""
    if request.params.get("output") == "dicom":
        return InputError("unsupported_output", "output=dicom needs OIP v2 (REST binary extension or gRPC): "
                          "v1 :predict answers JSON only")
    return None


def _no_tensors_with_dicom(request: EngineRequest) -> InputError | None:
    """Heatmap tensors are views of the JSON answer, which output=dicom does not send."""
    if request.params.get("output") == "dicom":
        return InputError("bad_parameter", "heatmap tensors come with the JSON answer: with output=dicom the "
                          "one output is 'dicom'")
    return None


class RowError(GrpcException):
    """A refused request: HTTP status + the JSON body (REST handler in server.py; gRPC via kserve's interceptor)."""

    def __init__(self, error: InputError) -> None:
        self.status = error.status
        self.body = encode_row(error)
        super().__init__(status_code=GRPC_STATUS.get(error.status, StatusCode.INTERNAL),
                         details=self.body.decode("ascii"))


class EngineModel(Model):
    """One verified, unpacked ``.mar``; ``predict`` handles v2 ``InferRequest`` and v1 ``{"instances"}``."""

    def __init__(self, name: str, mar: Path) -> None:
        super().__init__(name)
        self.mar = Path(mar)
        self.archive: LoadedArchive | None = None
        self.budget: Budget | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Verify the sha256 (and signature) file, unpack safely and build the engine: batch/archive.load_archive,
        the loader batch jobs use, so the engine applies the archive's own served settings."""
        self.archive = load_archive(self.mar)
        config = served_config(self.archive.directory)
        settings = self.archive.handler_settings
        torch.set_num_threads(int(settings.get("torch_num_threads", 1)))
        engine = self.archive.engine
        unit = "Mpx-passes" if engine.kind == "ddsm" else "Mvoxel-passes"
        batch_size = int(config.get("batchSize", 1))
        self.budget = Budget.from_settings(settings, batch_size, online=True, unit=unit)
        engine.budget = self.budget
        self.batcher = Batcher(self._answer_batch, batch_size, float(config.get("maxBatchDelay", 0)))
        log.info("loaded %s as %r; engine %s; budget %s; batch %d within %s ms; speed-ups %s", engine.model_info(),
                 self.name, engine_record(), self.budget, batch_size, config.get("maxBatchDelay", 0),
                 engine.speedups_applied)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def get_input_types(self) -> list[dict]:
        return [{"name": oip.FILE_INPUT, "datatype": "BYTES", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        out = [{"name": oip.RESULT_OUTPUT, "datatype": "BYTES", "shape": [1]},
               {"name": oip.DICOM_OUTPUT, "datatype": "BYTES", "shape": [-1]}]  # output=dicom: one file an element
        methods = sorted((self.archive.engine.describe().get("methods") or {}) if self.archive else {})
        dtype = "FP16" if self.archive and self.archive.engine.kind == "ddsm" else "FP32"
        return out + [{"name": f"{oip.HEATMAP_PREFIX}{m}", "datatype": dtype, "shape": [-1, -1]
                       if dtype == "FP16" else [-1, -1, -1]} for m in methods]

    def _answer_batch(self, rows: list[EngineRequest | InputError]) -> list[tuple[bytes | list[bytes], Answer]]:
        """In the engine thread: the batch's answers, each encoded (and over-budget answers refused): the JSON
        body, or an ``output=dicom`` answer's DICOM files (TorchServe's budget: on its multipart body)."""
        assert self.archive is not None
        try:
            results = answer_rows(self.archive.engine, rows)
        except Exception as err:  # noqa: BLE001 -- as the TorchServe adapter: answer every row, never fail the batch
            results = [as_row_error(err, "batch", log)] * len(rows)
        answers: list[tuple[bytes | list[bytes], Answer]] = []
        for result in results:
            body, content_type, result = encode_answer(result, self.budget, log)
            if isinstance(result, DicomObjects):
                try:
                    answers.append((oip.dicom_parts(body, content_type), result))
                except Exception as err:  # noqa: BLE001 -- isolated to its row, as encode_answer's failures
                    error = as_row_error(err, "encode", log)
                    answers.append((encode_row(error), error))
                continue
            answers.append((body, result))
        return answers

    async def _answer(self, row, refuse: Callable[[EngineRequest], InputError | None] | None = None
                      ) -> tuple[bytes | list[bytes], Answer]:
        """Parse one row, check it with ``refuse`` (what this route cannot answer), queue it for the next batch;
        raise its RowError when refused."""
        assert self.batcher is not None
        try:
            request: EngineRequest | InputError = parse_row(row)
        except Exception as err:  # noqa: BLE001 -- isolated to this request (as_row_error)
            request = as_row_error(err, "parse", log)
        if isinstance(request, EngineRequest) and refuse is not None:
            request = refuse(request) or request
        if isinstance(request, InputError):
            log.info("request rejected: %s", request.code)  # the code only: never input content
            raise RowError(request)
        body, result = await self.batcher.submit(request)
        if isinstance(result, InputError):
            log.info("request rejected: %s", result.code)
            raise RowError(result)
        return body, result

    async def predict(self, payload, headers: dict[str, str] | None = None):
        from_rest = not (isinstance(payload, InferRequest) and payload.from_grpc)
        if from_rest and oip.accepts_dicom(headers):  # OIP answers have one form: the objects are the output dicom
            raise RowError(InputError("unsupported_output", "OIP answers cannot be multipart/related: ask for "
                                      "the DICOM objects with parameter output=dicom on v2 (output 'dicom')"))
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        return await self._predict_v1(payload)

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter()
        try:
            row = oip.v2_row(request)
            wanted = oip.requested_heatmaps(request)
        except InputError as err:
            raise RowError(err) from None
        body, result = await self._answer(row, _no_tensors_with_dicom if wanted is not None else None)
        if isinstance(result, DicomObjects):
            return self._dicom_response(request, body)
        assert isinstance(body, bytes) and isinstance(result, dict)
        # FP16 has no JSON form in OIP: with heatmap tensors every output is binary (raw on gRPC)
        binary = request.use_binary_outputs or wanted is not None
        result_out = InferOutput(oip.RESULT_OUTPUT, [1], "BYTES")
        result_out.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=binary)
        outputs = [result_out]
        for name, array in oip.heatmap_tensors(result, wanted) if wanted is not None else []:
            tensor = InferOutput(name, list(array.shape), "FP16" if array.dtype == np.float16 else "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            outputs.append(tensor)
        log.debug("v2 request answered in %.1f ms", (time.perf_counter() - started) * 1000)
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs,
                             from_grpc=request.from_grpc, use_binary_outputs=binary)

    def _dicom_response(self, request: InferRequest, files: list[bytes]) -> InferResponse:
        """``output=dicom``: the files as the one BYTES output ``dicom`` [N], always binary (DICOM is no UTF-8 text
        for a JSON string): REST binary extension, gRPC raw contents. No ``result``: TorchServe sends the objects only."""
        out = InferOutput(oip.DICOM_OUTPUT, [len(files)], "BYTES", parameters=dict(oip.DICOM_PARAMETERS))
        array = np.empty(len(files), dtype=np.object_)
        array[:] = files  # element by element: np.array(files) could make a fixed-width bytes array
        out.set_data_from_numpy(array, binary_data=True)
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=[out],
                             from_grpc=request.from_grpc, use_binary_outputs=True)

    async def _predict_v1(self, payload) -> dict:
        """``{"instances": [{"data": "<base64>", ...}]}``: one instance answers as its JSON body or its 4xx;
        several answer in order, a refused one as its ``{code, error, message}`` (as TorchServe's gRPC does)."""
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise RowError(InputError("bad_json_body", 'a v1 request is {"instances": [{"data": "<base64 file>", '
                                      '...parameters}]}'))
        if len(instances) == 1:
            _, result = await self._answer({"body": instances[0]}, _no_dicom_on_v1)
            return {"predictions": [result]}
        answers = await asyncio.gather(*(self._answer({"body": i}, _no_dicom_on_v1) for i in instances),
                                       return_exceptions=True)
        predictions = []
        for answer in answers:
            if isinstance(answer, RowError):
                predictions.append(json.loads(answer.body))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                predictions.append(answer[1])
        return {"predictions": predictions}
