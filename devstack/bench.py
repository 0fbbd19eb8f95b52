"""``make bench``: serving overhead measured side by side in one run.

Latency: p50/p95 of one mammography patch prediction through TorchServe REST vs the same engine
called in-process. Throughput: 8 concurrent REST clients (TorchServe's dynamic batching groups
their requests) vs in-process batches of 8. Both sides use the same archive, input and thread count,
and run one after the other so they do not share the 2 cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from devstack.services import TorchServeServer
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.tiling import PATCH_SIZE


def sample_patch(data_dir: Path) -> bytes:
    """A real 227x227 crop of a held-out synthetic mammogram, as a 16-bit PNG."""
    with open(data_dir / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    image = np.asarray(Image.open(data_dir / row["path"]))
    y, x = image.shape[0] // 2 - PATCH_SIZE // 2, image.shape[1] // 4
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[y:y + PATCH_SIZE, x:x + PATCH_SIZE])).save(buf, "PNG")
    return buf.getvalue()


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def time_calls(call, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def in_process(mar: Path, payload: bytes, n: int, clients: int, rounds: int) -> tuple[list[float], float]:
    """Latencies of single requests and throughput of batches, engine loaded from the same archive."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(tmp)
        engine = Engine.from_model_dir(Path(tmp))
        latencies = time_calls(lambda: engine.run([EngineRequest(payload)]), n)
        batch = [EngineRequest(payload) for _ in range(clients)]
        started = time.perf_counter()
        for _ in range(rounds):
            engine.run(batch)
        return latencies, clients * rounds / (time.perf_counter() - started)


def bench_serving(mar: Path, data_dir: Path, n: int, clients: int, per_client: int, threads: int) -> dict:
    payload = sample_patch(data_dir)
    torch.set_num_threads(threads)
    local, local_tput = in_process(mar, payload, n, clients, max(1, per_client))

    with tempfile.TemporaryDirectory() as tmp:
        server = TorchServeServer(workdir=Path(tmp), model_store=mar.parent.resolve(), models={"ddsm": mar.name})
        server.start()
        try:
            url, headers = f"{server.inference_url}/predictions/ddsm", server.auth_header()
            session = requests.Session()

            def one() -> None:
                r = session.post(url, data=payload, headers=headers, timeout=120)
                r.raise_for_status()

            remote = time_calls(one, n)

            def client() -> None:
                with requests.Session() as s:
                    for _ in range(per_client):
                        s.post(url, data=payload, headers=headers, timeout=300).raise_for_status()

            started = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda _: client(), range(clients)))
            remote_tput = clients * per_client / (time.perf_counter() - started)
        finally:
            server.stop()
    lp50, lp95 = percentiles(local)
    rp50, rp95 = percentiles(remote)
    return {"in_process_ms": (lp50, lp95), "rest_ms": (rp50, rp95), "in_process_tput": local_tput,
            "rest_tput": remote_tput, "n": n, "clients": clients}


def print_serving(result: dict) -> None:
    (lp50, lp95), (rp50, rp95) = result["in_process_ms"], result["rest_ms"]
    print(f"\nServing overhead, mammography patch, {result['n']} sequential requests")
    print(f"  {'':24}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"  {'in-process engine':24}{lp50:10.1f}{lp95:10.1f}")
    print(f"  {'TorchServe REST':24}{rp50:10.1f}{rp95:10.1f}")
    print(f"  ratio REST / in-process: p50 {rp50 / lp50:.2f}x, p95 {rp95 / lp95:.2f}x")
    print(f"\nThroughput, {result['clients']} concurrent clients vs in-process batches of {result['clients']}")
    print(f"  in-process batched  {result['in_process_tput']:8.1f} items/s")
    print(f"  TorchServe REST     {result['rest_tput']:8.1f} items/s")
    print(f"  ratio REST / in-process: {result['rest_tput'] / result['in_process_tput']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("build"))
    parser.add_argument("-n", type=int, default=40, help="sequential requests per side")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (= the worker's torch_num_threads)")
    parser.add_argument("--skip-occlusion", action="store_true")
    args = parser.parse_args(argv)
    result = bench_serving(args.build / "model-store" / "ddsm.mar", args.build / "data" / "ddsm", args.n,
                           args.clients, args.per_client, args.threads)
    print_serving(result)
    if not args.skip_occlusion:
        from devstack import bench_occlusion
        bench_occlusion.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
