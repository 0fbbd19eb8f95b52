"""Full mammograms at the seed's depth: per-method latency, CPU speed-ups and incremental occlusion.

``python -m devstack.bench_fullimage`` builds a DDSM engine around a ResNet-152 (the seed's
DeepMiner depth; random conv weights, BatchNorm statistics from the image so activations are O(1)
as in a trained net: latency does not depend on the weights) and, with ``--archive``, the demo
archive's own net, then on one synthetic mammogram at the served full-image size (908 px short side):

1. the forward pass (trunk + class map) under each CPU speed-up, interleaved with eager in the same
   run: channels-last, torch.fx conv-BN folding, TorchScript freeze (oneDNN fusion), optionally
   ``torch.compile``; max abs difference of the class-probability map against eager;
2. every DDSM method through ``Engine.run_prepared``, eager vs the engine with the speed-ups that
   ``model_store/configs/ddsm.yaml`` turns on, with the max abs difference of each map;
3. occlusion at the default window: incremental (``medxplain_engine/occlusion2d.py``, eager and
   with the served speed-ups) vs the former Captum implementation, both on ``--occlusion-sample``
   consecutive windows with the time extrapolated to all (their drops compared), or with
   ``--occlusion-sample 0`` on the whole map (the maps compared).

Times are medians of ``--repeats`` runs; on a loaded machine compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medxplain_engine.engine import Engine, EngineRequest, Prepared
from medxplain_engine.mammo import DDSMEngine
from medxplain_engine.occlusion2d import incremental_drops, occlusion_map_reference, relevance_map, window_boxes
from medxplain_engine.options import parse_options
from medxplain_models.bundle import ModelBundle
from medxplain_models.ddsm import CLASS_NAMES, DDSMConfig, DDSMResNet, fused_trunk
from medxplain_models.preprocess import ddsm_normalise

METHODS = ("none", "cam", "gradcam", "saliency", "guided_backprop", "integrated_gradients")
SERVED = {"channels_last": True, "fused_forward": False}  # what model_store/configs/ddsm.yaml turns on


def sample_image(data_dir: Path) -> bytes:
    """The first held-out full mammogram of the synthetic set, or a generated one when there is none."""
    index = data_dir / "images.csv"
    if index.is_file():
        with open(index, newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["split"] == "test")
        return (data_dir / row["path"]).read_bytes()
    import io

    from model_store.synth.mammo import generate_view

    image, _, _ = generate_view(np.random.default_rng(0), 2, "LEFT", "CC", 1400, 908)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def calibrated(model: DDSMResNet, grey: torch.Tensor) -> DDSMResNet:
    """BatchNorm statistics of the image itself (one cumulative train-mode pass): O(1) activations."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(ddsm_normalise(grey[:, 0]))
    return model.eval()


def engine_for(model: DDSMResNet, tmp: Path, name: str) -> DDSMEngine:
    bundle = ModelBundle(kind="ddsm", name=name, version="bench", class_names=list(CLASS_NAMES), model=model)
    return Engine.from_model_dir(bundle.save(tmp / name))  # type: ignore[return-value]


def archive_engine(mar: Path, tmp: Path) -> DDSMEngine:
    """The archive's bundle (weights, config, decision) under this checkout's engine code."""
    if not (tmp / "archive" / "model.json").is_file():
        with zipfile.ZipFile(mar) as zf:
            for member in ("model.json", "weights.pt", "model_card.json", "unit_labels.json"):
                zf.extract(member, tmp / "archive")
    return Engine.from_model_dir(tmp / "archive")  # type: ignore[return-value]


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant, the variants alternating within every round (contention hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {k: float(np.median(v)) for k, v in times.items()}


class _ClassMap(torch.nn.Module):
    def __init__(self, model: DDSMResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model.class_map(self.model.features(x)), dim=1)


def bench_forward(model: DDSMResNet, x: torch.Tensor, repeats: int, with_compile: bool) -> None:
    """Prediction-only forward (trunk + class-probability map) per speed-up, interleaved with eager."""
    eager = copy.deepcopy(model).eval()
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fused = fused_trunk(model, channels_last=True)
    fused_eager = fused_trunk(model, channels_last=False)

    def fused_call(trunk):
        return lambda inp: torch.softmax(model.class_map(trunk(inp)), dim=1)

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager": _ClassMap(eager), "channels_last": lambda inp: _ClassMap(cl)(inp.contiguous(
            memory_format=torch.channels_last)),
        "fx conv-bn fold": fused_call(fused_eager), "fx fold + channels_last": lambda inp: fused_call(fused)(
            inp.contiguous(memory_format=torch.channels_last)),
    }
    build: dict[str, float] = {}
    with torch.no_grad():
        started = time.perf_counter()
        frozen = torch.jit.freeze(torch.jit.trace(_ClassMap(cl).eval(), x_cl))
        frozen(x_cl)
        build["jit.freeze + channels_last"] = time.perf_counter() - started
    variants["jit.freeze + channels_last"] = lambda inp: frozen(inp.contiguous(memory_format=torch.channels_last))
    if with_compile:
        compiled = torch.compile(_ClassMap(cl).eval())
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(x_cl)
        build["torch.compile + channels_last"] = time.perf_counter() - started
        variants["torch.compile + channels_last"] = lambda inp: compiled(inp.contiguous(
            memory_format=torch.channels_last))
    with torch.inference_mode():
        reference = variants["eager"](x)
        diffs = {k: float((v(x) - reference).abs().max()) for k, v in variants.items()}
        for v in variants.values():  # warm-up of every variant before timing
            v(x)
        times = interleaved({k: (lambda v=v: v(x)) for k, v in variants.items()}, repeats)
    print(f"  forward (trunk + class map) at {tuple(x.shape[2:])}, median of {repeats}, interleaved:")
    print(f"    {'variant':32s} {'ms':>9s} {'vs eager':>9s} {'max|dp|':>9s}  build")
    for k, t in times.items():
        extra = f"  {build[k]:.1f} s" if k in build else ""
        print(f"    {k:32s} {t * 1000:9.0f} {times['eager'] / t:8.2f}x {diffs[k]:9.1e}{extra}")


def bench_methods(eager: DDSMEngine, fast: DDSMEngine, payload: bytes, repeats: int, ig_steps: int,
                  methods: tuple[str, ...] = METHODS) -> None:
    """Each method through the engine stages (eager vs the served speed-ups), with the maps' difference."""
    print(f"  methods (engine infer + explain + serialise), eager vs {SERVED}, median of {repeats}:")
    print(f"    {'method':22s} {'eager ms':>9s} {'fast ms':>9s} {'ratio':>7s} {'max|dmap|/max|map|':>19s} {'max|dp|':>9s}")
    for method in methods:
        params = {"explain": "" if method == "none" else method, "top_k": 0, "ig_steps": ig_steps}
        items = {k: e.prepare_isolated(_request(payload, params)) for k, e in (("eager", eager), ("fast", fast))}
        results = {}

        def run(name: str, engine: DDSMEngine, items: dict = items, results: dict = results) -> None:
            item: Prepared = items[name]  # type: ignore[assignment]
            inference = engine.infer([item])[0]
            explanation = engine.explain(item, inference)
            results[name] = (inference, explanation)

        times = interleaved({"eager": lambda: run("eager", eager), "fast": lambda: run("fast", fast)}, repeats)
        (inf_e, exp_e), (inf_f, exp_f) = results["eager"], results["fast"]
        dmap = max((float(np.abs(exp_e.heatmaps[m] - exp_f.heatmaps[m]).max() / max(np.abs(exp_e.heatmaps[m]).max(), 1e-30))
                    for m in exp_e.heatmaps), default=0.0)
        dp = float(np.abs(inf_e.probabilities - inf_f.probabilities).max())
        print(f"    {method:22s} {times['eager'] * 1000:9.0f} {times['fast'] * 1000:9.0f} "
              f"{times['eager'] / times['fast']:6.2f}x {dmap:19.1e} {dp:9.1e}")


def _request(payload: bytes, params: dict) -> EngineRequest:
    return EngineRequest(payload, {k: v for k, v in params.items() if v != ""})


def bench_occlusion(engines: dict[str, DDSMEngine], payload: bytes, sample: int) -> None:
    """Default-window occlusion on the full image: incremental (per engine) vs Captum (the former implementation).

    ``sample`` > 0: both sides run the same block of consecutive windows from the middle of the grid
    (as the incremental batches them) and their time is extrapolated to all windows; 0: whole maps.
    """
    eager = engines["eager"]
    item: Prepared = eager.prepare_isolated(_request(payload, {}))  # type: ignore[assignment]
    grey = item.inputs
    shape = tuple(grey.shape[2:])
    options = parse_options({"explain": "occlusion"}, eager.bundle.class_names, eager.methods,
                            eager.default_methods, eager.model.num_units)
    size, stride, _ = eager.methods["occlusion"].geometry(shape, options)
    score = eager.scores["full"]
    with torch.inference_mode():
        target = int(score(grey).argmax())
        base = float(score(grey)[0, target])
    lo, hi = window_boxes(shape, size, stride)
    n = len(lo)
    pick = np.arange(n) if not sample or sample >= n else np.arange(sample) + (n - sample) // 2
    extrapolate = n / len(pick)
    fill = ddsm_normalise(torch.zeros(1, 1, 1))[0, :, 0, 0]
    what = "all windows" if len(pick) == n else f"{len(pick)} consecutive windows, extrapolated to all"
    print(f"  occlusion at {shape}, window {size} stride {stride}: {n} windows ({what}), target {target}")
    started = time.perf_counter()
    if len(pick) == n:
        reference_map = occlusion_map_reference(score, grey, target, size, stride)
    else:
        with torch.inference_mode():
            ref_drops = []
            for start in range(0, len(pick), 8):  # as Captum: perturbations_per_eval=8, a full forward each
                batch = grey.repeat(len(pick[start:start + 8]), 1, 1, 1)
                for b, w in enumerate(pick[start:start + 8]):
                    batch[b, 0, lo[w][0]:hi[w][0], lo[w][1]:hi[w][1]] = 0
                ref_drops.extend((base - score(batch)[:, target]).tolist())
    t_ref = (time.perf_counter() - started) * extrapolate
    print(f"    {'Captum Occlusion, eager (before)':36s} {t_ref:8.1f} s")
    for name, engine in engines.items():
        head = engine.scores["full"].head
        started = time.perf_counter()
        drops = incremental_drops(engine.model, head, ddsm_normalise(grey[:, 0]), target, lo[pick], hi[pick], fill)
        got = relevance_map(shape, lo, hi, drops) if len(pick) == n else None
        t_inc = (time.perf_counter() - started) * extrapolate
        if got is not None:
            diff = f"max|dmap| {np.abs(reference_map - got).max():.1e} (map up to {np.abs(reference_map).max():.1e})"
        else:
            diff = (f"max|ddrop| {np.abs(np.array(ref_drops) - drops).max():.1e} "
                    f"(drops up to {np.abs(ref_drops).max():.1e})")
        print(f"    {'incremental, ' + name:36s} {t_inc:8.1f} s  {t_ref / t_inc:6.1f}x  {diff}")


def bench_depth(label: str, make_engine: Callable[[], DDSMEngine], payload: bytes, args: argparse.Namespace) -> None:
    eager, fast = make_engine(), make_engine()
    applied = fast.apply_speed_settings({**SERVED, "warm_up": True})
    print(f"\n== {label}: ResNet-{eager.model.config.depth}, {torch.get_num_threads()} threads ==")
    print(f"  served speed-ups {SERVED}: initialize applies them and warms up in {applied['warm_up_s']} s")
    item: Prepared = eager.prepare_isolated(_request(payload, {}))  # type: ignore[assignment]
    bench_forward(eager.model, ddsm_normalise(item.inputs[:, 0]), args.repeats, args.compile)
    bench_methods(eager, fast, payload, args.repeats, args.ig_steps, tuple(args.methods.split(",")))
    if not args.no_occlusion:
        bench_occlusion({"eager": eager, "served speed-ups": fast}, payload, args.occlusion_sample)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_fullimage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("build/data/ddsm"),
                        help="synthetic DDSM set (its first held-out image; generated when absent)")
    parser.add_argument("--archive", type=Path, default=None, help="also bench this ddsm.mar's own net (demo depth)")
    parser.add_argument("--depth", type=int, default=152, help="ResNet depth of the random-weight engine (default 152)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as served)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--ig-steps", type=int, default=16, help="integrated gradients steps (API default 16)")
    parser.add_argument("--occlusion-sample", type=int, default=48,
                        help="consecutive windows both occlusion implementations run, time extrapolated to all "
                             "(0: whole maps and the maps' max abs difference)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"methods to time through the engine ('none' = prediction only; default {','.join(METHODS)})")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor; slow to build)")
    parser.add_argument("--no-occlusion", action="store_true", help="skip the occlusion comparison")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notes, once per call
    warnings.filterwarnings("ignore", message=".*did not already require gradients.*")  # Captum, every call
    torch.set_num_threads(args.threads)
    payload = sample_image(args.data)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.archive:
            bench_depth(f"demo archive {args.archive.name}", lambda: archive_engine(args.archive, tmp), payload, args)
        torch.manual_seed(0)
        model = DDSMResNet(DDSMConfig(depth=args.depth))
        grey = engine_for(model, tmp, "probe").prepare_isolated(_request(payload, {})).inputs  # type: ignore[union-attr]
        engine_for(calibrated(model, grey), tmp, "seed")
        bench_depth("seed depth (random weights, BatchNorm from the image)",
                    lambda: Engine.from_model_dir(tmp / "seed"), payload, args)  # type: ignore[arg-type,return-value]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
