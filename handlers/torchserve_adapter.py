"""The only TorchServe-specific code: turn TorchServe's request rows into engine requests and back.

TorchServe hands ``handle`` one dict per request of a dynamic batch. Every row is parsed and
answered on its own (a batch may mix predictions, explanations and bad inputs); an input error
becomes a 4xx ``{code, error, message}`` for that row only and the worker keeps running.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from medxplain_contract.errors import InputError, as_row_error
from medxplain_engine.budget import Budget
from medxplain_engine.device import parse_bool
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_engine.rows import answer_rows, encode_answer, encode_dicom_row, encode_row, parse_row
from medxplain_engine.version import engine_record

log = logging.getLogger(__name__)
__all__ = ["EngineHandler", "assigned_device", "encode_dicom_row", "encode_row", "parse_row"]  # rows: shared
def assigned_device(properties: dict) -> str:
    """The device TorchServe assigned this worker, as its own BaseHandler reads it: ``cuda:<gpu_id>`` when
    CUDA is available and the frontend gave a ``gpu_id`` (model-config.yaml ``deviceType: gpu``), else the CPU."""
    gpu_id = properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return f"cuda:{int(gpu_id)}"
    return "cpu"


class EngineHandler:
    """TorchServe custom handler: ``initialize(context)`` + ``handle(data, context)``."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.budget: Budget | None = None
        self.initialized = False
        self._parse_ms = 0.0  # of the current batch, for its Server-Timing header

    def initialize(self, context) -> None:
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler", {}) or {}
        torch.set_num_threads(int(settings.get("torch_num_threads", 1)))
        device = assigned_device(context.system_properties)
        # the speed-ups and the warm-up (so kernel set-up does not land on the first request) as configured
        self.engine = Engine.from_model_dir(Path(context.system_properties["model_dir"]), device,
                                            amp=parse_bool(settings.get("amp", False), "handler.amp"),
                                            settings=settings)
        speedups = self.engine.speedups_applied
        unit = "Mpx-passes" if self.engine.kind == "ddsm" else "Mvoxel-passes"
        self.budget = Budget.from_settings(settings, int(config.get("batchSize", 1)), online=True, unit=unit)
        self.engine.budget = self.budget
        self.initialized = True
        log.info("loaded %s; engine %s; device %s; amp %s; budget %s; speed-ups %s", self.engine.model_info(),
                 engine_record(), self.engine.device, self.engine.amp, self.budget, speedups)

    def handle(self, data: list[dict], context) -> list:
        """One answer per row, whatever any row holds: nothing a row sends may escape as a batch-wide 503.

        Each row's ``Server-Timing`` header carries what the engine's ``timing_ms`` cannot hold
        (the adapter's parse, the JSON encoding of that very body, the whole handler call; docs/api.md).
        """
        started = time.perf_counter()
        self._parse_ms = 0.0
        try:
            results = self._results(data, context)
        except Exception as err:  # noqa: BLE001 -- a bug here would fail the whole batch: answer every row instead
            results = [as_row_error(err, "batch", log)] * len(data)
        out = []
        json_ms = []
        refused = 0
        for i, result in enumerate(results):
            encode_started = time.perf_counter()
            body, content_type, result = encode_answer(result, self.budget, log)
            if isinstance(result, InputError):
                refused += 1
                log.info("request %d rejected: %s", i, result.code)  # the code only: never input content
                _set_status(context, i, result)
            _set_content_type(context, i, content_type)
            out.append(body)
            json_ms.append(_ms(encode_started))
        handler_ms = _ms(started)
        for i, encoded in enumerate(json_ms):
            _set_timing(context, i, {"parse": self._parse_ms, "json": encoded, "handler": handler_ms})
        if refused:
            log.info("dynamic batch of %d rows, %d refused", len(out), refused)
        return out

    def _results(self, data: list[dict], context) -> list[dict | InputError]:
        assert self.engine is not None
        if _is_describe(context):  # management API: GET /models/{name}?customized=true
            return [self.engine.describe()]
        requests: list[EngineRequest | InputError] = []
        started = time.perf_counter()
        for i, row in enumerate(data):
            try:
                request = parse_row(row or {}, _is_explain(context, i))
                if _accepts_dicom(context, i):
                    request.params.setdefault("output", "dicom")
                requests.append(request)
            except Exception as err:  # noqa: BLE001 -- isolated to its row (handlers/errors.as_row_error)
                requests.append(as_row_error(err, "parse", log))
        self._parse_ms = _ms(started)
        return answer_rows(self.engine, requests)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _set_timing(context, idx: int, timing: dict[str, float]) -> None:
    """W3C Server-Timing (``name;dur=ms``): TorchServe passes a row's headers on to its REST response."""
    try:
        context.set_response_header(idx, "Server-Timing", ", ".join(f"{k};dur={v}" for k, v in timing.items()))
    except Exception:  # noqa: BLE001 -- as _set_status
        log.debug("could not set the timing header of row %d", idx)


def _set_status(context, idx: int, err: InputError) -> None:
    try:
        context.set_response_status(err.status, err.message, idx=idx)
    except Exception:  # noqa: BLE001 -- a context without per-row status (tests calling handle directly)
        log.debug("could not set the status of row %d", idx)


def _set_content_type(context, idx: int, content_type: str) -> None:
    try:
        context.set_response_content_type(idx, content_type)
    except Exception:  # noqa: BLE001 -- as _set_status
        log.debug("could not set the content type of row %d", idx)


def _is_describe(context) -> bool:
    try:
        return str(context.get_request_header(0, "describe")) == "True"
    except (AttributeError, KeyError, IndexError, TypeError):
        return False


def _accepts_dicom(context, idx: int) -> bool:
    """``Accept: multipart/related; type="application/dicom"`` asks for DICOM objects, as ``output=dicom`` does."""
    accept = ""
    for name in ("Accept", "accept"):  # TorchServe keeps header names as the client sent them
        try:
            accept += str(context.get_request_header(idx, name) or "").lower()
        except Exception:  # noqa: BLE001, S112 -- no header, or a context without headers
            continue
    return "multipart/related" in accept and "application/dicom" in accept


def _is_explain(context, idx: int) -> bool:
    try:
        return str(context.get_request_header(idx, "explain")).lower() == "true"
    except Exception:  # noqa: BLE001 -- no header, or a context without headers
        return False
