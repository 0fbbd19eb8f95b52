"""One bad row never hurts its neighbours: poisoned rows share dynamic batches with valid ones.

Against the real TorchServe (ddsm: batchSize 8, maxBatchDelay 5 ms): valid and poisoned requests are
released together from a barrier so TorchServe batches them; every valid one must get 200 and every
poisoned one a 4xx. The handler logs each batch's size and refusals, which shows the batches were mixed.
Plus, in process: a batched forward that fails is retried row by row so only the guilty row fails.
"""

from __future__ import annotations

import base64
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch

from medxplain_contract.errors import InputError
from medxplain_engine.engine import Engine, EngineRequest, Prepared
from tests import hostile, inputs
from tests.schema_check import checked

PATCH = inputs.patch_png(5)
B64 = base64.b64encode(PATCH).decode()
POISON = [
    {"files": {"data": ("data", PATCH), "explain": ("explain", b"\xff\xfe\xfa")}},  # non-UTF-8 field
    {"files": {"data": ("data", PATCH), "params": (None, "{not json")}},
    {"files": {"data": ("data", PATCH), "top_k": (None, "99999999999")}},  # out of range
    {"json": {"data": B64, "explain": 7}},  # wrong JSON type
    {"json": {"data": B64, "unit_maps": [True]}},
    {"data": PATCH[:300]},  # truncated PNG
    {"data": inputs.png_bytes(np.zeros((32, 4000), np.uint8))},  # long, thin image
    {"data": inputs.nested_dicom(40)},
]
ROUNDS = 4


def _post(server, kwargs: dict) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/ddsm", headers=server.auth_header(), timeout=120,
                         **kwargs)


def _batch_lines(server) -> list[tuple[int, int]]:
    log = server.workdir / "logs" / "model_log.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [(int(n), int(m)) for n, m in re.findall(r"dynamic batch of (\d+) rows, (\d+) refused", text)]


def test_poisoned_rows_in_the_same_dynamic_batch_leave_valid_rows_at_200(torchserve):
    pids = hostile.worker_pids(torchserve, "ddsm")
    before = len(_batch_lines(torchserve))
    jobs = [("valid", {"data": PATCH})] * len(POISON) + [("poison", p) for p in POISON]
    failures = []
    for _ in range(ROUNDS):
        barrier = threading.Barrier(len(jobs))

        def fire(job, barrier=barrier):
            barrier.wait()
            return job[0], _post(torchserve, job[1])

        with ThreadPoolExecutor(len(jobs)) as pool:
            for kind, r in pool.map(fire, jobs):
                if kind == "valid" and r.status_code != 200:
                    failures.append((kind, r.status_code, r.text[:200]))
                elif kind == "valid":
                    checked(r, "response")
                if kind == "poison":
                    try:
                        hostile.check_answer(hostile.Answer(r.status_code, r.content, r.reason or ""))
                        assert r.status_code >= 400
                    except AssertionError as err:
                        failures.append((kind, r.status_code, str(err)[:200]))
    assert not failures, failures
    batches = _batch_lines(torchserve)[before:]
    mixed = [(n, m) for n, m in batches if 0 < m < n]
    assert mixed, f"no dynamic batch mixed valid and poisoned rows: {batches}"
    assert hostile.worker_pids(torchserve, "ddsm") == pids
    print(f"\n{len(batches)} dynamic batches, {len(mixed)} mixed; largest {max(n for n, _ in batches)} rows")


def test_a_failing_batched_forward_is_retried_row_by_row(ddsm_bundle):
    engine = Engine.from_model_dir(ddsm_bundle[0])
    original = engine.decode
    poison = b"poison-marker"

    def decode(payload, options):
        if payload is poison:  # a row whose empty tensor breaks the batched forward, and its own
            good = original(PATCH, options)
            return Prepared(good.inputs[..., :0], good.mode, options, good.geometry, dict(good.meta))
        return original(payload, options)

    engine.decode = decode  # type: ignore[method-assign]
    with torch.no_grad():
        results = engine.run([EngineRequest(PATCH, {"top_k": 2}), EngineRequest(poison, {"top_k": 2}),
                              EngineRequest(inputs.patch_png(6), {"top_k": 2})])
    assert isinstance(results[1], InputError) and results[1].status == 500
    checked(results[1].to_dict(), "error")
    assert results[1].message == "the forward step failed for this input; the error was logged"
    for good in (results[0], results[2]):
        assert isinstance(good, dict) and len(checked(good, "response")["units"]) == 2
    alone = engine.run([EngineRequest(PATCH, {"top_k": 2})])[0]
    for name, p in alone["prediction"]["probabilities"].items():
        assert abs(results[0]["prediction"]["probabilities"][name] - p) < 1e-4
