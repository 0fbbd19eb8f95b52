"""Bounded load test: many concurrent mixed requests to both models over REST and gRPC.

``make bench`` runs it against a TorchServe it starts from the archives (the production
``config.properties`` with loopback ports, token authorization on): by default 200 requests sent
at once by 200 clients, a fixed mix of mammography patches and full images (with and without CAM)
and MRI volumes (with and without Grad-CAM), over REST (raw body, multipart, JSON) and gRPC
(``InferenceAPIsService.Predictions``). It prints p50/p95/p99 per kind and overall, throughput
and the error count, and exits 1 if any request failed (listing the first failures' status codes,
never response bodies).

Bounded: a fixed number of requests, one deadline for the whole run (no request starts after it
and every request's timeout ends at it), loopback addresses only; it stops by itself.

Why threads and not locust: importing locust runs gevent's ``monkey.patch_all()`` on the whole
process (threads, sockets, the test session that imports this module), and gRPC's C core only
cooperates with gevent through the experimental ``grpc.experimental.gevent.init_gevent()``.
Blocking ``requests`` and gRPC calls release the GIL while they wait, so N threads released
together by a barrier are N requests in flight, which is all this test needs from a load tool.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import ipaddress
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np
import requests
from PIL import Image

from medxplain_client.client import TOKEN_ENV, read_token
from medxplain_client.stubs import ensure_stubs
from medxplain_client.transports import MAX_MESSAGE_BYTES

PATCH_SIZE = 227  # medxplain_models.tiling.PATCH_SIZE (not imported: that pulls in scipy for one constant)
DEFAULT_REQUESTS = 200
DEFAULT_CONCURRENCY = 200  # docker/serve/config.properties job_queue_size must stay above this
# The burst of 200 took ~5 min (plus ~2 min start and warm-up) on 2 cores shared with other jobs,
# test-profile models. The whole run is bounded, not each request: in a burst the last request
# waits for all the others, so a per-request limit would measure the queue, not a fault.
DEFAULT_TIME_LIMIT = 900.0
FIRST_ERRORS = 10


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: which input, how it travels, which parameters, how often."""

    name: str
    model: str  # ddsm | adni
    input: str  # patch | full | volume
    transport: str  # rest-raw | rest-multipart | rest-json | grpc
    weight: int
    params: tuple[tuple[str, str], ...] = ()
    endpoint: str = "predictions"  # rest-raw only: a raw body carries no parameters, /explanations asks for CAM
    heatmap: str | None = None  # the method the response must carry

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.params)


# Patches (cheap, batched 8 at a time by TorchServe) dominate; full mammograms and volumes are rarer
# and costlier. Every kind appears once in any 21 consecutive requests (the weights' sum, schedule()).
KINDS: tuple[Kind, ...] = (
    Kind("ddsm patch", "ddsm", "patch", "rest-raw", 4),
    Kind("ddsm patch /explanations", "ddsm", "patch", "rest-raw", 2, endpoint="explanations", heatmap="cam"),
    Kind("ddsm patch json top_k=3", "ddsm", "patch", "rest-json", 3, (("top_k", "3"),)),
    Kind("ddsm patch cam", "ddsm", "patch", "grpc", 3, (("explain", "cam"),), heatmap="cam"),
    Kind("ddsm patch cam", "ddsm", "patch", "rest-multipart", 2, (("explain", "cam"),), heatmap="cam"),
    Kind("ddsm full cam", "ddsm", "full", "rest-multipart", 1, (("explain", "cam"),), heatmap="cam"),
    Kind("ddsm full", "ddsm", "full", "grpc", 1, (("top_k", "3"),)),
    Kind("adni volume", "adni", "volume", "rest-multipart", 2, (("top_k", "3"),)),
    Kind("adni volume", "adni", "volume", "grpc", 2),
    Kind("adni volume gradcam", "adni", "volume", "rest-json", 1, (("explain", "gradcam"),), heatmap="gradcam"),
)


def label(kind: Kind) -> str:
    return f"{kind.name} [{kind.transport}]"


def schedule(kinds: tuple[Kind, ...], n: int) -> list[Kind]:
    """Smooth weighted round robin (nginx's): a deterministic interleaving whose every prefix follows
    the weights, so a short run still has every kind and 200 requests are not sorted by kind."""
    total, current, out = sum(k.weight for k in kinds), [0] * len(kinds), []
    for _ in range(n):
        for i, kind in enumerate(kinds):
            current[i] += kind.weight
        best = max(range(len(kinds)), key=current.__getitem__)
        current[best] -= total
        out.append(kinds[best])
    return out


@dataclass(frozen=True)
class Inputs:
    patch: bytes
    full: bytes
    volume: bytes

    def __getitem__(self, name: str) -> bytes:
        return getattr(self, name)


def _first_test_file(data_dir: Path, index: str) -> Path:
    with open(data_dir / index, newline="") as f:
        return data_dir / next(r for r in csv.DictReader(f) if r["split"] == "test")["path"]


def load_inputs(ddsm_dir: Path, adni_dir: Path) -> Inputs:
    """Held-out synthetic cases: a full mammogram, a 227x227 crop of it (16-bit PNG) and an MRI volume."""
    full_path = _first_test_file(ddsm_dir, "images.csv")
    image = np.asarray(Image.open(full_path))
    y, x = image.shape[0] // 2 - PATCH_SIZE // 2, image.shape[1] // 4
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[y:y + PATCH_SIZE, x:x + PATCH_SIZE])).save(buf, "PNG")
    return Inputs(buf.getvalue(), full_path.read_bytes(), _first_test_file(adni_dir, "subjects.csv").read_bytes())


@dataclass(frozen=True)
class Target:
    base_url: str  # REST inference API
    grpc_target: str  # host:port of grpc_inference_port
    token: str | None


class Failure(Exception):
    """A failed request; ``status`` is an HTTP status, a gRPC code name or a short client-side reason."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class Sender:
    """One simulated client: its own HTTP session and gRPC channel (opened on first use)."""

    def __init__(self, target: Target, stubs) -> None:
        self.target = target
        self.stubs = stubs  # medxplain_client._generated, imported once by run_load
        self.session: requests.Session | None = None
        self.channel: grpc.Channel | None = None
        self.stub = None

    def send(self, kind: Kind, payload: bytes, timeout: float) -> None:
        """Send one request; raise Failure unless the answer is a prediction (with the heatmap asked for)."""
        if timeout <= 0:
            raise Failure("not_sent_time_limit")
        body = self._grpc(kind, payload, timeout) if kind.transport == "grpc" else self._rest(kind, payload, timeout)
        _check(body, kind)

    def _rest(self, kind: Kind, payload: bytes, timeout: float) -> bytes:
        if self.session is None:
            self.session = requests.Session()
            if self.target.token:
                self.session.headers["Authorization"] = f"Bearer {self.target.token}"
        url = f"{self.target.base_url}/{kind.endpoint}/{kind.model}"
        if kind.transport == "rest-raw":
            sent = {"data": payload}
        elif kind.transport == "rest-multipart":
            sent = {"files": {"data": ("input", payload, "application/octet-stream")}, "data": kind.fields}
        else:  # rest-json
            sent = {"json": {"data": base64.b64encode(payload).decode(), **kind.fields}}
        try:
            r = self.session.post(url, timeout=timeout, **sent)
        except requests.Timeout:
            raise Failure("timeout") from None
        except requests.ConnectionError:
            raise Failure("connection_failed") from None
        if r.status_code != 200:
            raise Failure(str(r.status_code))
        return r.content

    def _grpc(self, kind: Kind, payload: bytes, timeout: float) -> bytes:
        if self.channel is None:
            options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
            self.channel = grpc.insecure_channel(self.target.grpc_target, options=options)
            self.stub = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        request_type = self.stubs.inference_pb2.PredictionsRequest
        metadata = (("authorization", f"Bearer {self.target.token}"),) if self.target.token else ()
        request = request_type(model_name=kind.model,
                               input={"data": payload, **{k: v.encode() for k, v in kind.params}})
        try:
            return self.stub.Predictions(request, timeout=timeout, metadata=metadata).prediction
        except grpc.RpcError as err:
            raise Failure(f"grpc {err.code().name}") from None  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.channel is not None:
            self.channel.close()


def _check(body: bytes, kind: Kind) -> None:
    """A 200 must hold a prediction; over gRPC a handler's per-request 4xx arrives as a normal reply."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Failure("bad_response") from None
    if not isinstance(doc, dict) or "prediction" not in doc:
        code = doc.get("code") if isinstance(doc, dict) else None
        raise Failure(str(code) if isinstance(code, int) else "bad_response")
    if kind.heatmap and kind.heatmap not in (doc.get("heatmaps") or {}):
        raise Failure("missing_heatmap")


@dataclass
class Sample:
    kind: Kind
    seconds: float
    status: str | None  # None = success


@dataclass
class Report:
    requests: int
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    warmup: list[Sample] = field(default_factory=list)
    wall_seconds: float = 0.0
    hung: int = 0  # threads still waiting after the deadline (their requests count as errors)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.warmup + self.samples if s.status is not None]

    @property
    def ok(self) -> bool:
        return not self.errors and len(self.samples) == self.requests and not self.hung


def _timed(sender: Sender, kind: Kind, inputs: Inputs, deadline: float, timeout: float | None) -> Sample:
    started = time.perf_counter()
    try:
        left = deadline - time.monotonic()
        sender.send(kind, inputs[kind.input], left if timeout is None else min(timeout, left))
        status = None
    except Failure as err:
        status = err.status
    return Sample(kind, time.perf_counter() - started, status)


def run_load(target: Target, inputs: Inputs, n_requests: int = DEFAULT_REQUESTS,
             concurrency: int = DEFAULT_CONCURRENCY, time_limit: float = DEFAULT_TIME_LIMIT,
             timeout: float | None = None,
             warmup: bool = True, kinds: tuple[Kind, ...] = KINDS) -> Report:
    """Warm up each kind once (sequentially), then send ``n_requests`` from ``concurrency`` threads."""
    deadline = time.monotonic() + time_limit
    report = Report(n_requests, concurrency)
    stubs = ensure_stubs() if any(k.transport == "grpc" for k in kinds) else None
    if warmup:  # first calls load lazily built state; a failing kind stops the run before the burst
        sender = Sender(target, stubs)
        report.warmup = [_timed(sender, kind, inputs, deadline, timeout) for kind in kinds]
        sender.close()
        if report.errors:
            return report
    plan = schedule(kinds, n_requests)
    n_threads = max(1, min(concurrency, n_requests))
    burst: list[float] = []  # when the barrier released every client at once
    start = threading.Barrier(n_threads, action=lambda: burst.append(time.perf_counter()))
    lock = threading.Lock()
    taken = 0  # requests handed to a client so far (they are sent in plan order)
    samples: list[Sample] = []

    def client() -> None:
        nonlocal taken
        sender = Sender(target, stubs)
        try:
            start.wait()
            while True:
                with lock:
                    if taken >= n_requests or time.monotonic() >= deadline:
                        return
                    kind, taken = plan[taken], taken + 1
                sample = _timed(sender, kind, inputs, deadline, timeout)
                with lock:
                    samples.append(sample)
        finally:
            sender.close()

    threads = [threading.Thread(target=client, daemon=True, name=f"load-{i}") for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:  # a request's timeout ends at the deadline; the margin covers connection teardown
        t.join(max(0.0, deadline - time.monotonic()) + 30)
    report.wall_seconds = time.perf_counter() - burst[0] if burst else 0.0
    with lock:
        report.hung = sum(t.is_alive() for t in threads)
        report.samples = samples + [Sample(kind, 0.0, "not_sent_time_limit") for kind in plan[taken:]]  # a copy
    return report


def _ms(samples: list[Sample]) -> tuple[float, float, float]:
    arr = np.asarray([s.seconds for s in samples]) * 1000
    return tuple(float(np.percentile(arr, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def print_report(report: Report, target: Target, out=None) -> None:
    out = out or sys.stdout  # looked up per call, so redirected / captured stdout is honoured
    width = max(len(label(k)) for k in KINDS) + 2
    if report.warmup:
        w = ", ".join(f"{s.seconds * 1000:.0f}" for s in report.warmup)
        print(f"warm-up (one request per kind, sequential), ms: {w}", file=out)
    print(f"\nLoad test: {report.requests} mixed requests from {report.concurrency} concurrent clients, "
          f"REST {target.base_url} + gRPC {target.grpc_target}, token auth {'on' if target.token else 'off'}",
          file=out)
    print(f"  {'kind':{width}}{'n':>5}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}", file=out)
    by_kind: dict[str, list[Sample]] = {}
    for s in report.samples:
        by_kind.setdefault(label(s.kind), []).append(s)
    rows = [(label(k), by_kind.get(label(k), [])) for k in KINDS] + [("all", report.samples)]
    for name, samples in rows:
        good = [s for s in samples if s.status is None]
        errors = len(samples) - len(good)
        p = "".join(f"{v:10.0f}" for v in _ms(good)) if good else f"{'-':>10}" * 3
        print(f"  {name:{width}}{len(samples):5d}{errors:8d}{p}", file=out)
    good = [s for s in report.samples if s.status is None]
    rate = len(good) / report.wall_seconds if report.wall_seconds else 0.0
    print(f"  wall {report.wall_seconds:.1f} s, throughput {rate:.2f} requests/s, "
          f"errors {len(report.errors) + report.hung}", file=out)
    if report.hung:
        print(f"  {report.hung} client threads still waiting after the time limit", file=out)
    if report.errors:  # status codes only: a body may echo input or server internals
        counts = Counter(s.status for s in report.errors)
        print("  errors by status: " + ", ".join(f"{status} x{n}" for status, n in counts.most_common()), file=out)
        first = "; ".join(f"{label(s.kind)}: {s.status}" for s in report.errors[:FIRST_ERRORS])
        print(f"  first errors: {first}", file=out)


def _loopback(url_or_target: str) -> bool:
    host = urlsplit(url_or_target if "//" in url_or_target else f"//{url_or_target}").hostname or ""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def _start_server(model_store: Path, workdir: Path):
    from devstack.services import TorchServeServer  # only when this run owns the server

    missing = [name for name in ("ddsm.mar", "adni.mar") if not (model_store / name).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in {model_store}: run `make archives`")
    server = TorchServeServer(workdir=workdir, model_store=model_store.resolve(),
                              models={"ddsm": "ddsm.mar", "adni": "adni.mar"})
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("server (one of)")
    where.add_argument("--model-store", type=Path, help="start TorchServe on random loopback ports with "
                       "ddsm.mar and adni.mar from this folder, stop it afterwards")
    where.add_argument("--url", help="a running server's REST inference API (loopback only), e.g. http://127.0.0.1:8080")
    where.add_argument("--grpc", help="its gRPC inference address (with --url), e.g. 127.0.0.1:7070")
    where.add_argument("--key-file", type=Path, help=f"TorchServe's key_file.json (with --url; or set {TOKEN_ENV})")
    parser.add_argument("--data", type=Path, default=Path("build/data"), help="synthetic data root (ddsm/, adni/)")
    parser.add_argument("--ddsm-data", type=Path, help="mammography set (default: DATA/ddsm)")
    parser.add_argument("--adni-data", type=Path, help="MRI set (default: DATA/adni)")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests in the burst")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="client threads")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                        help="seconds for the whole run, warm-up included")
    parser.add_argument("--timeout", type=float, help="seconds per request (default: until the time limit)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the sequential request per kind")
    args = parser.parse_args(argv)
    if (args.model_store is None) == (args.url is None) or (args.url and not args.grpc):
        parser.error("give --model-store, or --url with --grpc")
    if min(args.requests, args.concurrency) < 1 or args.time_limit <= 0:
        parser.error("--requests, --concurrency and --time-limit must be positive")
    if args.url and not (_loopback(args.url) and _loopback(args.grpc)):
        parser.error("--url and --grpc must be loopback addresses: this tool is for the local stack only")
    inputs = load_inputs(args.ddsm_data or args.data / "ddsm", args.adni_data or args.data / "adni")

    with tempfile.TemporaryDirectory(prefix="medxai-load-") as tmp:
        server = _start_server(args.model_store, Path(tmp)) if args.model_store else None
        try:
            if server:
                target = Target(server.inference_url, f"127.0.0.1:{server.grpc_port}", server.keys()["inference"])
            else:
                token = os.environ.get(TOKEN_ENV) or (read_token(args.key_file) if args.key_file else None)
                target = Target(args.url.rstrip("/"), args.grpc, token)
            report = run_load(target, inputs, args.requests, args.concurrency, args.time_limit, args.timeout,
                              warmup=not args.no_warmup)
        finally:
            if server:
                server.stop()
    print_report(report, target)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
