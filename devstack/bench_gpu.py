"""``make bench-gpu``: the engine on a GPU against the same engine on the CPU, in one run.

Needs a CUDA device (exits 2 with one line without one). For each model and input kind -- a
mammography patch, a full mammogram, an MRI volume -- it prints:

- latency per method: median wall time of a prediction-only request, and each attribution method's
  median ``timing_ms`` (the engine's own per-method clock; maps come back to the host, so GPU work
  is finished when it stops), on the CPU and on the GPU, and their ratio;
- agreement of the GPU results with the CPU ones, as PASS/FAIL checks against stated tolerances:
  probabilities max |diff| <= --prob-tol; every map max |diff| / max |CPU map| <= --map-tol and Spearman
  rank correlation >= --rank-tol (cuDNN picks other conv algorithms than oneDNN: results differ in
  rounding, never in meaning); the amp path's probabilities (fp16 autocast) within --amp-tol;
- serving overhead on the GPU: patch prediction p50/p95 through TorchServe REST (the archive
  repacked with ``deviceType: gpu``, so TorchServe assigns gpu_id 0) vs the in-process GPU engine.

Both sides load the same archive and see the same inputs, and run one after the other. Exit status:
0 all checks passed, 1 a check failed, 2 no CUDA device (or bad arguments). ``--device cpu`` runs the
whole bench with the CPU on both sides: a self-check of this script on a machine without a GPU
(ratios ~1, every check must pass), not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
from scipy.stats import spearmanr

from devstack.bench import percentiles, sample_patch
from devstack.services import TorchServeServer
from medxplain_contract.encodings import decode_map
from medxplain_contract.integrity import signing_key, write_digest
from medxplain_engine.engine import Engine, EngineRequest
from model_store.archive import gpu_config

PATCH_METHODS = "cam,gradcam,saliency,guided_backprop,integrated_gradients,occlusion"
FULL_METHODS = "cam,gradcam,saliency,integrated_gradients"
MRI_METHODS = "gradcam,sensitivity,guided_backprop,integrated_gradients,occlusion,area_occlusion"


@dataclass
class Case:
    """One input kind of one model: its archive, payload and the methods to time."""

    label: str
    mar: Path
    payload: bytes
    methods: str
    params: dict = field(default_factory=dict)


@dataclass
class Checks:
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _ in self.rows)



def time_calls(call, n: int, warmup: int = 3) -> list[float]:
    """Wall times (s) of ``n`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out

def full_mammogram(data_dir: Path) -> bytes:
    """A held-out synthetic mammogram as sent (16-bit PNG)."""
    with open(data_dir / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (data_dir / row["path"]).read_bytes()


def mri_volume(data_dir: Path) -> bytes:
    with open(data_dir / "subjects.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    return (data_dir / row["path"]).read_bytes()


def unpack(mar: Path, dest: Path) -> Path:
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(dest)
    return dest


def gpu_archive(mar: Path, store: Path) -> Path:
    """The same archive with its model-config.yaml saying ``deviceType: gpu`` (+ ``deviceIds: [0]``) and a
    fresh published digest, so TorchServe (which checks it) assigns the worker a GPU."""
    store.mkdir(parents=True, exist_ok=True)
    out = store / mar.name
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        config = json.loads(src.read("MAR-INF/MANIFEST.json")).get("model", {}).get("configFile")
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config:
                data = gpu_config(data.decode()).encode()
            dst.writestr(info, data)
    if config is None:
        raise SystemExit(f"{mar}: no model-config.yaml named in its manifest")
    write_digest(out, signing_key())
    return out


def run_once(engine: Engine, case: Case, explain: str) -> dict:
    body = engine.run([EngineRequest(case.payload, {**case.params, "explain": explain})])[0]
    if not isinstance(body, dict):
        raise SystemExit(f"{case.label}: the engine refused the input ({body.code}: {body.message})")
    return body


def latencies(engine: Engine, case: Case, repeats: int) -> tuple[dict[str, float], dict]:
    """{"predict": ms, method: ms} medians, and the last explained response (for the agreement checks)."""
    predict = time_calls(lambda: run_once(engine, case, ""), repeats, warmup=2)
    per_method: dict[str, list[float]] = {m: [] for m in case.methods.split(",")}
    body: dict = {}
    run_once(engine, case, case.methods)  # warm-up: cuDNN autotuning, Captum hooks, allocator
    for _ in range(repeats):
        body = run_once(engine, case, case.methods)
        for method, samples in per_method.items():
            samples.append(float(body["timing_ms"][method]))
    return {"predict": float(np.median(predict) * 1000), **{m: float(np.median(v)) for m, v in per_method.items()}}, body


def compare(case: Case, cpu: dict, gpu: dict, amp: dict, args: argparse.Namespace, checks: Checks) -> None:
    p_cpu, p_gpu = cpu["prediction"]["probabilities"], gpu["prediction"]["probabilities"]
    diff = max(abs(p_cpu[n] - p_gpu[n]) for n in p_cpu)
    checks.add(f"{case.label} probabilities", diff <= args.prob_tol, f"max |diff| {diff:.2e} (tol {args.prob_tol:g})")
    p_amp = amp["prediction"]["probabilities"]
    diff = max(abs(p_cpu[n] - p_amp[n]) for n in p_cpu)
    checks.add(f"{case.label} probabilities, amp ({amp['model'].get('precision')})", diff <= args.amp_tol,
               f"max |diff| {diff:.2e} (tol {args.amp_tol:g})")
    checks.add(f"{case.label} label", cpu["prediction"]["label"] == gpu["prediction"]["label"],
               f"cpu {cpu['prediction']['label']}, gpu {gpu['prediction']['label']}")
    for method in case.methods.split(","):
        a = decode_map(cpu["heatmaps"][method]).astype(np.float64)
        b = decode_map(gpu["heatmaps"][method]).astype(np.float64)
        scale = float(np.abs(a).max()) or 1.0
        rel = float(np.abs(a - b).max()) / scale
        rho = float(spearmanr(a.ravel(), b.ravel()).statistic) if a.std() > 0 and b.std() > 0 else float(
            np.array_equal(a, b))
        checks.add(f"{case.label} {method}", rel <= args.map_tol and rho >= args.rank_tol,
                   f"max |diff| / max |cpu| {rel:.2e} (tol {args.map_tol:g}), Spearman {rho:.4f} (>= {args.rank_tol:g})")


def print_latency(case: Case, cpu: dict[str, float], gpu: dict[str, float], device: str) -> None:
    print(f"\n{case.label}: median ms over the repeats (CPU threads {torch.get_num_threads()}, "
          f"GPU {_gpu_name(device)})")
    print(f"  {'':24}{'CPU':>10}{'GPU':>10}{'CPU/GPU':>10}")
    for name, on_cpu in cpu.items():
        print(f"  {name:24}{on_cpu:10.1f}{gpu[name]:10.1f}{on_cpu / max(gpu[name], 1e-3):9.1f}x")


def bench_case(case: Case, args: argparse.Namespace, checks: Checks) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = unpack(case.mar, Path(tmp))
        cpu_engine = Engine.from_model_dir(directory, device="cpu")
        cpu_times, cpu_body = latencies(cpu_engine, case, args.repeats)
        del cpu_engine
        gpu_engine = Engine.from_model_dir(directory, device=args.device)
        gpu_times, gpu_body = latencies(gpu_engine, case, args.repeats)
        del gpu_engine
        amp_body = run_once(Engine.from_model_dir(directory, device=args.device, amp=True), case, "")
        _free()
    print_latency(case, cpu_times, gpu_times, args.device)
    compare(case, cpu_body, gpu_body, amp_body, args, checks)


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "none (--device cpu)"


def in_process_gpu(directory: Path, payload: bytes, n: int, device: str) -> list[float]:
    engine = Engine.from_model_dir(directory, device=device)
    return time_calls(lambda: engine.run([EngineRequest(payload)]), n)


def bench_serving(mar: Path, payload: bytes, n: int, device: str) -> None:
    """Patch prediction p50/p95: TorchServe REST on the GPU vs the in-process GPU engine."""
    with tempfile.TemporaryDirectory() as tmp:
        local = in_process_gpu(unpack(mar, Path(tmp) / "unpacked"), payload, n, device)
        _free()  # the in-process engine is gone: its memory goes back before TorchServe's worker loads
        store = Path(tmp) / "store"
        gpu_mar = gpu_archive(mar, store)
        server = TorchServeServer(workdir=Path(tmp) / "ts", model_store=store, models={"ddsm": gpu_mar.name})
        server.start()
        try:
            url, headers = f"{server.inference_url}/predictions/ddsm", server.auth_header()
            session = requests.Session()
            first = session.post(url, data=payload, headers=headers, timeout=120)
            first.raise_for_status()
            remote = time_calls(lambda: session.post(url, data=payload, headers=headers, timeout=120).raise_for_status(), n)
        finally:
            server.stop()
    (lp50, lp95, _), (rp50, rp95, _) = percentiles(local), percentiles(remote)
    print(f"\nServing overhead on the GPU, mammography patch prediction, {n} sequential requests")
    print(f"  {'':24}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"  {'in-process engine':24}{lp50:10.1f}{lp95:10.1f}")
    print(f"  {'TorchServe REST':24}{rp50:10.1f}{rp95:10.1f}")
    print(f"  ratio REST / in-process: p50 {rp50 / lp50:.2f}x, p95 {rp95 / lp95:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("build"), help="holds model-store/ and data/ (make archives)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side and input (after warm-up)")
    parser.add_argument("-n", type=int, default=40, help="sequential REST / in-process requests for the overhead")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--patch-methods", default=PATCH_METHODS)
    parser.add_argument("--full-methods", default=FULL_METHODS)
    parser.add_argument("--mri-methods", default=MRI_METHODS)
    parser.add_argument("--prob-tol", type=float, default=1e-3, help="max |p_gpu - p_cpu| (fp32)")
    parser.add_argument("--amp-tol", type=float, default=2e-2, help="max |p_amp - p_cpu| (fp16 autocast)")
    parser.add_argument("--map-tol", type=float, default=2e-2, help="max |map diff| / max |cpu map|")
    parser.add_argument("--rank-tol", type=float, default=0.98, help="min Spearman rank correlation of the maps")
    parser.add_argument("--skip-serving", action="store_true", help="leave out the TorchServe overhead")
    parser.add_argument("--device", default="cuda", help="the GPU side: cuda or cuda:N (default cuda); cpu = "
                        "self-check of this script without a GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench-gpu: no CUDA device is available to this process (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    store, data = args.build / "model-store", args.build / "data"
    patch = sample_patch(data / "ddsm")
    cases = [Case("ddsm patch", store / "ddsm.mar", patch, args.patch_methods, {"occlusion_stride": 28}),
             Case("ddsm full mammogram", store / "ddsm.mar", full_mammogram(data / "ddsm"), args.full_methods),
             Case("adni volume", store / "adni.mar", mri_volume(data / "adni"), args.mri_methods)]
    checks = Checks()
    started = time.perf_counter()
    for case in cases:
        bench_case(case, args, checks)
    if not args.skip_serving:
        bench_serving(store / "ddsm.mar", patch, args.n, args.device)
    print(f"\n{len(checks.rows) - checks.failed}/{len(checks.rows)} checks passed "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
