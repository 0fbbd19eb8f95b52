"""``make bench``: serving overhead measured side by side in one run, with where the time goes.

Latency: p50/p95/p99 of (a) one mammography patch prediction and (b) one full mammogram with CAM,
through TorchServe REST, and through the KServe runtime (``python -m medxplain_kserve``, OIP v2 REST,
binary extension), each vs the same engine called in-process. The two sides alternate request by
request (the order flips every request), so contention from other work on the machine hits both
alike; only one side computes at a time. Throughput: 8 concurrent REST clients (TorchServe's dynamic
batching groups their requests) vs in-process batches of 8, alternated in rounds.

Breakdown (mean ms per REST request): the client's wall time split into what TorchServe's frontend
reports on its metrics port (``ts_inference_latency_microseconds``: request in to response out;
``ts_queue_latency_microseconds``: waiting for a batch and a worker), the handler's own
``Server-Timing`` header (parse, JSON, whole handler call) and the engine's ``timing_ms`` stages
(prepare, forward, units, methods, serialise). "HTTP + client" is the wall time TorchServe does not
see; "IPC + worker loop" is the frontend's time minus queue and handler: the socket hop to the
Python worker and TorchServe's own (de)serialisation of the batch.

Both sides use the same archive, inputs and CPU threads: in-process torch runs on as many threads
as the server's workers have together (``minWorkers`` x ``handler.torch_num_threads``). ``--stock`` adds stock TorchServe's ``image_classifier`` handler on
the same ResNet weights (devstack/bench_stock.py) as a reference ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import os
import re
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from devstack.services import KServeServer, TorchServeServer
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_engine.served import served_config
from medxplain_models.tiling import PATCH_SIZE

ENGINE_STAGES = ("prepare", "forward", "units", "serialise")  # plus one entry per explanation method


@dataclass
class Case:
    """One kind of request, sent identically to both sides."""

    name: str
    payload: bytes
    endpoint: str  # "predictions" | "explanations" (the latter = the explain header = params explain=default)
    params: dict = field(default_factory=dict)  # what the adapter turns the REST request into


@dataclass
class CaseResult:
    case: Case
    local_s: list[float]
    rest_s: list[float]
    timing: dict[str, list[float]]  # stage -> ms per REST request (timing_ms + Server-Timing)
    frontend_ms: float | None  # mean per request, from TorchServe's metrics
    queue_ms: float | None


def held_out_rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "images.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


def sample_patch(data_dir: Path) -> bytes:
    """A real 227x227 crop of a held-out synthetic mammogram, as a 16-bit PNG."""
    row = held_out_rows(data_dir)[0]
    image = np.asarray(Image.open(data_dir / row["path"]))
    y, x = image.shape[0] // 2 - PATCH_SIZE // 2, image.shape[1] // 4
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[y:y + PATCH_SIZE, x:x + PATCH_SIZE])).save(buf, "PNG")
    return buf.getvalue()


def sample_full(data_dir: Path) -> bytes:
    """A held-out synthetic mammogram file as stored (the bytes a client would send)."""
    return (data_dir / held_out_rows(data_dir)[0]["path"]).read_bytes()


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(samples) * 1000
    return tuple(float(np.percentile(arr, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def server_timing(header: str | None) -> dict[str, float]:
    """``name;dur=ms, ...`` (W3C Server-Timing) -> {name: ms}."""
    out = {}
    for part in (header or "").split(","):
        match = re.fullmatch(r"\s*([\w.-]+)\s*;\s*dur=([0-9.]+)\s*", part)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def scrape(metrics_url: str, model: str) -> dict[str, float]:
    """TorchServe's per-model frontend counters. The Prometheus text format is parsed by hand: three
    lines of it do not justify a client library in the image."""
    text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for name in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds", "ts_inference_requests_total"):
        for line in text.splitlines():
            if line.startswith(name + "{") and f'model_name="{model}"' in line:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Rest:
    """One keep-alive client session against a running TorchServe."""

    def __init__(self, server: TorchServeServer, model: str) -> None:
        self.server, self.model = server, model
        self.headers = server.auth_header()
        self.session = requests.Session()

    def post(self, case: Case, session: requests.Session | None = None) -> requests.Response:
        r = (session or self.session).post(f"{self.server.inference_url}/{case.endpoint}/{self.model}",
                                           data=case.payload, headers=self.headers, timeout=300)
        r.raise_for_status()
        return r


class OipAnswer:
    """The parts of a TorchServe response the bench reads, from an OIP v2 answer (``result`` output)."""

    def __init__(self, r: requests.Response) -> None:
        self.headers = {}  # no Server-Timing: the engine's timing_ms is in the JSON
        self.body = json.loads(r.json()["outputs"][0]["data"][0])

    def json(self) -> dict:
        return self.body


class OipRest:
    """One keep-alive session against the KServe runtime: the file as the BYTES input ``data``."""

    def __init__(self, server: KServeServer, model: str) -> None:
        self.server, self.model = server, model
        self.headers = server.auth_header()
        self.session = requests.Session()

    def post(self, case: Case, session: requests.Session | None = None) -> OipAnswer:
        element = len(case.payload).to_bytes(4, "little") + case.payload
        header = json.dumps({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(element)}}],
                             "parameters": case.params}).encode()
        r = (session or self.session).post(f"{self.server.inference_url}/v2/models/{self.model}/infer",
                                           data=header + element, timeout=300,
                                           headers={**self.headers, "Inference-Header-Content-Length": str(len(header))})
        r.raise_for_status()
        return OipAnswer(r)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    out = call()
    return time.perf_counter() - started, out


def run_case(engine: Engine, rest: Rest, case: Case, n: int, warmup: int = 3) -> CaseResult:
    """n requests per side, alternating sides and flipping the order every request."""
    request = EngineRequest(case.payload, case.params)
    for _ in range(warmup):
        engine.run([request])
        rest.post(case)
    metrics = getattr(rest.server, "metrics_url", None)  # TorchServe's frontend counters; KServe: none
    before = scrape(metrics, rest.model) if metrics else {}
    local, remote, timing = [], [], {}
    for i in range(n):
        order = ("local", "rest") if i % 2 == 0 else ("rest", "local")
        for side in order:
            if side == "local":
                seconds, _ = timed(lambda: engine.run([request]))
                local.append(seconds)
                continue
            seconds, response = timed(lambda: rest.post(case))
            remote.append(seconds)
            stages = {**response.json()["timing_ms"], **server_timing(response.headers.get("Server-Timing"))}
            for name, ms in stages.items():
                timing.setdefault(name, []).append(float(ms))
    after = scrape(metrics, rest.model) if metrics else {}
    count = after.get("ts_inference_requests_total", 0) - before.get("ts_inference_requests_total", 0)

    def mean_ms(name: str) -> float | None:
        if name not in after or count <= 0:
            return None
        return (after[name] - before.get(name, 0.0)) / count / 1000

    return CaseResult(case, local, remote, timing, mean_ms("ts_inference_latency_microseconds"),
                      mean_ms("ts_queue_latency_microseconds"))


def throughput(engine: Engine, rest: Rest, case: Case, clients: int, per_client: int, rounds: int,
               repeats: int = 2) -> tuple[float, float]:
    """items/s: in-process batches of ``clients`` vs ``clients`` concurrent REST clients, alternated."""
    batch = [EngineRequest(case.payload, case.params) for _ in range(clients)]
    sessions = [requests.Session() for _ in range(clients)]

    def client(s: requests.Session) -> None:
        for _ in range(per_client):
            rest.post(case, s)

    local_t = rest_t = 0.0
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda s: rest.post(case, s), sessions))  # warm connections
        for _ in range(repeats):
            local_t += timed(lambda: [engine.run(batch) for _ in range(rounds)])[0]
            rest_t += timed(lambda: list(pool.map(client, sessions)))[0]
    for s in sessions:
        s.close()
    return clients * rounds * repeats / local_t, clients * per_client * repeats / rest_t


def bench_serving(mar: Path, data_dir: Path, n: int, n_full: int, clients: int, per_client: int,
                  threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(model_dir)
        settings = served_config(model_dir)
        # The CPUs the server computes on: workers x their torch threads (handlers/torchserve_adapter.initialize)
        threads = threads or int(settings.get("minWorkers", 1)) * int(
            (settings.get("handler") or {}).get("torch_num_threads", 1))
        torch.set_num_threads(threads)
        engine = Engine.from_model_dir(model_dir)
        cases = [Case("patch prediction", sample_patch(data_dir), "predictions"),
                 Case("full mammogram + CAM", sample_full(data_dir), "explanations", {"explain": "default"})]
        runtimes = {}
        for label, server, side in (
                ("TorchServe REST", TorchServeServer(workdir=Path(tmp) / "ts", model_store=mar.parent.resolve(),
                                                     models={"ddsm": mar.name}), Rest),
                ("KServe OIP REST", KServeServer(workdir=Path(tmp) / "ks", model_store=mar.parent.resolve(),
                                                 models=(mar.stem,)), OipRest)):
            print(f"starting {label} ...", flush=True)
            server.start()
            try:
                rest = side(server, mar.stem)
                results = [run_case(engine, rest, case, count) for case, count in zip(cases, (n, n_full)) if count]
                runtimes[label] = {"cases": results,
                                   "tput": throughput(engine, rest, cases[0], clients, per_client, per_client)}
            finally:
                server.stop()
    first = runtimes["TorchServe REST"]
    return {"cases": first["cases"], "tput": first["tput"], "runtimes": runtimes, "clients": clients, "threads": threads,
            "batching": {k: settings.get(k) for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")}}


def print_latency(result: CaseResult, label: str = "TorchServe REST") -> None:
    local, remote = percentiles(result.local_s), percentiles(result.rest_s)
    print(f"\n{result.case.name} via {label}: {len(result.rest_s)} requests per side, alternating")
    print(f"  {'':24}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    print(f"  {'in-process engine':24}" + "".join(f"{v:10.1f}" for v in local))
    print(f"  {label:24}" + "".join(f"{v:10.1f}" for v in remote))
    print(f"  {'ratio REST / in-process':24}" + "".join(f"{r / l:9.2f}x" for r, l in zip(remote, local)))


def print_breakdown(result: CaseResult) -> None:
    """Mean ms per REST request; indented rows are parts of the row above them."""
    mean = {k: statistics.fmean(v) for k, v in result.timing.items()}
    wall = statistics.fmean(result.rest_s) * 1000
    handler = mean.get("handler")
    engine_stages = [s for s in ENGINE_STAGES if s in mean] + [
        k for k in mean if k not in ENGINE_STAGES and k not in ("parse", "json", "handler")]
    rows: list[tuple[str, float | None]] = [("REST wall time (client)", wall)]
    if result.frontend_ms is not None:
        rows.append(("  HTTP + client (not seen by TorchServe)", wall - result.frontend_ms))
        rows.append(("  TorchServe frontend (metrics port)", result.frontend_ms))
        rows.append(("    queue + batch delay", result.queue_ms))
        if handler is not None and result.queue_ms is not None:
            rows.append(("    IPC + worker loop", result.frontend_ms - result.queue_ms - handler))
    rows.append(("    handler (Server-Timing)", handler))
    rows.append(("      parse request", mean.get("parse")))
    for stage in engine_stages:
        rows.append((f"      engine: {stage}", mean[stage]))
    rows.append(("      JSON encode", mean.get("json")))
    if handler is not None:
        rest = handler - sum(mean.get(k, 0.0) for k in ("parse", "json", *engine_stages))
        rows.append(("      rest of the handler", rest))
    rows.append(("in-process engine.run (for reference)", statistics.fmean(result.local_s) * 1000))
    print(f"  breakdown, mean ms per request ({result.case.name}):")
    for label, value in rows:
        print(f"    {label:44}{'n/a' if value is None else f'{value:8.1f}':>8}")


def print_serving(result: dict) -> None:
    print(f"\nServing overhead (torch threads {result['threads']}; archive {result['batching']})")
    for label, runtime in result["runtimes"].items():
        for case in runtime["cases"]:
            print_latency(case, label)
            print_breakdown(case)
    print(f"\nSide by side (p50 / p95 ms; throughput with {result['clients']} concurrent clients vs in-process "
          f"batches of {result['clients']})")
    names = [c.case.name for c in result["cases"]]
    print(f"  {'':18}" + "".join(f"{n:>42}" for n in names) + f"{'items/s':>10}{'vs in-proc':>12}")
    for label, runtime in result["runtimes"].items():
        local_tput, tput = runtime["tput"]
        cells = []
        for case in runtime["cases"]:
            p50, p95, _ = percentiles(case.rest_s)
            l50, l95, _ = percentiles(case.local_s)
            cells.append(f"{p50:.1f}/{p95:.1f} (in-proc {l50:.1f}/{l95:.1f})")
        print(f"  {label:18}" + "".join(f"{c:>42}" for c in cells) + f"{tput:10.1f}{tput / local_tput:11.2f}x")
        print(f"  {'  in-process':18}" + " " * 42 * len(cells) + f"{local_tput:10.1f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("build"))
    parser.add_argument("--mar", type=Path, help="ddsm archive (default: BUILD/model-store/ddsm.mar)")
    parser.add_argument("--data", type=Path, help="ddsm data folder (default: BUILD/data/ddsm)")
    parser.add_argument("-n", type=int, default=60, help="patch requests per side")
    parser.add_argument("--n-full", type=int, default=20, help="full-mammogram requests per side (0: skip)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch threads in-process (default: the archive's workers x threads)")
    parser.add_argument("--stock", action="store_true", help="also time stock TorchServe's image_classifier")
    parser.add_argument("--skip-occlusion", action="store_true")
    return parser.parse_args(argv)


def own_session() -> None:
    """Linux autogroup scheduling shares the CPU between sessions first: TorchServe runs in a session of
    its own (services._start), so on a busy machine the in-process side, left in the caller's session
    with whatever else runs there, got less CPU and REST looked faster than in-process. One session each."""
    try:
        os.setsid()
    except (AttributeError, PermissionError):  # not POSIX, or already a process-group leader
        print("note: bench not in a session of its own; under contention the sides may get unequal CPU")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_session()
    mar = args.mar or args.build / "model-store" / "ddsm.mar"
    data = args.data or args.build / "data" / "ddsm"
    result = bench_serving(mar, data, args.n, args.n_full, args.clients, args.per_client, args.threads)
    print_serving(result)
    if args.stock:
        from devstack import bench_stock
        bench_stock.main(["--mar", str(mar), "--data", str(data), "-n", str(args.n), "--threads", str(result["threads"])])
    if not args.skip_occlusion:
        from devstack import bench_occlusion
        bench_occlusion.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
