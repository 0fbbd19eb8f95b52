"""Benchmark: the seed's plain 3D occlusion loop vs the incremental ``occlusion_map``.

Seed settings: cube 40, stride 12 on the 193x229x193 grid (5780 positions), the z-scored MNI-152
template as input with its brain mask, ClassificationModel3D with random weights in eval mode
(BatchNorm statistics taken from the input, so the probability drops are not vanishingly small).
The plain loop (one full forward pass per position, no batching, no skipping) would take hours, so
it is timed on a few positions spread over the brain and extrapolated to the whole grid. The fast
method runs on the full grid unless a pilot run predicts more than ``--limit`` seconds; then it too
is timed on a subset and extrapolated.

Every method runs in its own spawned process; its peak RSS (Linux VmHWM, which sees torch's
allocations, unlike tracemalloc) is reported whole and over the RSS after setup (model and volume
loaded). Both use the same torch thread count. On a 2-core machine that also runs other work, the
plain loop is about as fast with 1 thread as with 2, and the incremental one ~3x faster (its many
small ops each wait for an OpenMP thread whose core another process holds)."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from medxplain_engine.occlusion3d import (
    Window,
    default_batch_size,
    incremental_drops,
    occluded_windows,
    reference_drops,
    relevance_map,
    window_grid,
)
from medxplain_models.adni import POOL_SIZES, ADNIConfig, ClassificationModel3D
from model_store.synth.mri import template_grid

TARGET = 1  # AD
T = TypeVar("T")


@dataclass
class Setup:
    """Everything a worker process needs (pickled into it)."""

    volume: np.ndarray  # (D, H, W) normalised input
    mask: np.ndarray  # (D, H, W) bool brain mask
    state: dict[str, torch.Tensor]
    size: int
    stride: int
    threads: int
    batch_size: int | None


@dataclass
class Result:
    seconds: float  # measured
    windows: int  # occluded windows computed in the measured time
    total: float  # seconds for the whole map: measured if full_grid, else extrapolated
    drops: dict[tuple[int, ...], float]  # grid index -> p(unoccluded) - p(occluded)
    peak_mb: float
    delta_mb: float
    full_grid: bool
    batch_size: int


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the forking parent)."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 1024


def _reset_peak_rss() -> float:
    """Restart the peak at the current RSS (Linux clear_refs 5) and return it."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _peak_rss_mb()


def _calibrate(model: ClassificationModel3D, volume: torch.Tensor) -> None:
    """BatchNorm running statistics from the volume itself, so a random network's activations (and
    its probability drops) are O(1) rather than vanishing through four blocks."""
    x = volume
    for i in range(1, len(POOL_SIZES) + 1):
        y = getattr(model, f"Conv_{i}")(x)
        bn = getattr(model, f"Conv_{i}_bn")
        bn.running_mean.copy_(y.mean(dim=(0, 2, 3, 4)))
        bn.running_var.copy_(y.var(dim=(0, 2, 3, 4)))
        if i < len(POOL_SIZES):
            x = getattr(model, f"pool_{i}")(model.block(i, x))


@torch.inference_mode()
def build_setup(args: argparse.Namespace) -> Setup:
    template, mask, _ = template_grid(2 if args.quick else 1)
    brain = template[mask]
    volume = np.where(mask, (template - brain.mean()) / brain.std(), 0).astype(np.float32)
    torch.manual_seed(args.seed)
    model = ClassificationModel3D(ADNIConfig(input_shape=volume.shape)).eval()
    _calibrate(model, torch.from_numpy(volume)[None, None])
    return Setup(volume, np.asarray(mask), model.state_dict(), args.size, args.stride, args.threads, args.batch_size)


def _model(setup: Setup) -> tuple[ClassificationModel3D, torch.Tensor]:
    torch.set_num_threads(setup.threads)
    model = ClassificationModel3D(ADNIConfig(input_shape=setup.volume.shape))
    model.load_state_dict(setup.state)
    return model.eval(), torch.from_numpy(setup.volume)[None, None]


def _spread(windows: list[Window], count: int) -> list[Window]:
    """A deterministic subset: count windows evenly spaced over the list."""
    picks = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).round().astype(int))
    return [windows[i] for i in picks]


def _by_index(windows: list[Window], drops: np.ndarray) -> dict[tuple[int, ...], float]:
    return {idx: float(d) for (idx, _), d in zip(windows, drops)}


def _timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def plain_worker(setup: Setup, windows: list[Window], n_grid: int) -> Result:
    """The seed's loop: one full forward pass per position (batch 1, no skipping), timed on windows.

    ``reference_drops`` runs len(windows) + 1 passes (the first for p(unoccluded)); the map needs
    n_grid + 1.
    """
    model, volume = _model(setup)
    rss = _reset_peak_rss()
    seconds, drops = _timed(reference_drops, model, volume, TARGET, windows, 1)
    total = seconds / (len(windows) + 1) * (n_grid + 1)
    peak = _peak_rss_mb()
    return Result(seconds, len(windows), total, _by_index(windows, drops), peak, peak - rss, False, 1)


def _fast_map(model: ClassificationModel3D, volume: torch.Tensor, setup: Setup,
              batch_size: int) -> tuple[list[Window], np.ndarray]:
    """What ``occlusion_map`` does (window selection, incremental drops, upsampled map), keeping the drops."""
    shape = setup.volume.shape
    windows = occluded_windows(shape, setup.size, setup.stride, setup.mask)
    drops = incremental_drops(model, volume, TARGET, windows, batch_size)
    relevance_map(shape, setup.stride, windows, drops)
    return windows, drops


def fast_worker(setup: Setup, pilot: list[Window], n_brain: int, limit: float) -> Result:
    """The engine's incremental path on the full grid, unless a pilot predicts more than limit seconds.

    Pilot: one window (activation cache + one window) and the pilot subset; their difference gives
    seconds per window, the rest is the fixed cost of caching the unoccluded activations.
    """
    model, volume = _model(setup)
    batch_size = setup.batch_size or default_batch_size()
    rss = _reset_peak_rss()
    one, _ = _timed(incremental_drops, model, volume, TARGET, pilot[:1], batch_size)
    seconds, drops = _timed(incremental_drops, model, volume, TARGET, pilot, batch_size)
    per_window = max(seconds - one, 0.0) / (len(pilot) - 1)
    estimate = one - per_window + per_window * n_brain
    windows, full_grid = pilot, estimate <= limit
    if full_grid:
        seconds, (windows, drops) = _timed(_fast_map, model, volume, setup, batch_size)
    peak = _peak_rss_mb()
    return Result(seconds, len(windows), seconds if full_grid else estimate, _by_index(windows, drops), peak,
                  peak - rss, full_grid, batch_size)


def _in_child(fn: Callable[..., Result], *args: Any) -> Result:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _report(setup: Setup, plain: Result, fast: Result, n_grid: int, n_brain: int, common: list[Window]) -> None:
    drop_diff = max(abs(plain.drops[idx] - fast.drops[idx]) for idx, _ in common)
    map_diff = max(abs(max(plain.drops[idx], 0) - max(fast.drops[idx], 0)) for idx, _ in common)
    rows = [
        ("windows timed", plain.windows, fast.windows),
        ("seconds timed", f"{plain.seconds:.2f}", f"{fast.seconds:.2f}"),
        ("seconds per window", f"{plain.seconds / (plain.windows + 1):.4f}", f"{fast.seconds / fast.windows:.4f}"),
        ("seconds for the map", f"{plain.total:.0f} (extrapolated)",
         f"{fast.total:.1f}" + ("" if fast.full_grid else " (extrapolated)")),
        ("peak RSS MB", f"{plain.peak_mb:.0f}", f"{fast.peak_mb:.0f}"),
        ("peak RSS over setup MB", f"{plain.delta_mb:.0f}", f"{fast.delta_mb:.0f}"),
    ]
    print(f"grid {'x'.join(map(str, setup.volume.shape))}, cube {setup.size}, stride {setup.stride}: {n_grid} "
          f"positions, {n_brain} touch the brain; torch threads {setup.threads}, fast batch {fast.batch_size}")
    print(f"{'':24}{'plain loop (seed)':>26}{'incremental (fast)':>26}")
    for name, a, b in rows:
        print(f"{name:24}{a!s:>26}{b!s:>26}")
    print(f"speedup {plain.total / fast.total:.1f}x; max |difference| on {len(common)} common windows: "
          f"map {map_diff:.2e}, unclipped drop {drop_diff:.2e} "
          f"(largest |drop| there {max(abs(plain.drops[idx]) for idx, _ in common):.3f})")
    print(f"plain: one pass per position, timed on {plain.windows} positions spread over the brain and "
          f"extrapolated to all {n_grid} + 1 passes; fast: "
          + ("the full grid, as occlusion_map runs it" if fast.full_grid else
             f"a pilot predicted more than --limit seconds for the full grid, so it was timed on "
             f"{fast.windows} windows and extrapolated to {n_brain} (plus the activation cache)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_occlusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 mm grid (97x115x97), cube 20, stride 6")
    parser.add_argument("--size", type=int, help="cube edge in voxels (default 40, --quick 20)")
    parser.add_argument("--stride", type=int, help="grid step in voxels (default 12, --quick 6)")
    parser.add_argument("--plain-windows", type=int, default=20, help="positions timed for the plain loop")
    parser.add_argument("--pilot-windows", type=int, default=64, help="windows in the fast method's pilot")
    parser.add_argument("--limit", type=float, default=600.0,
                        help="seconds the fast full grid may take before it is extrapolated instead")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both methods")
    parser.add_argument("--batch-size", type=int,
                        help="windows per incremental batch (default: occlusion3d.default_batch_size())")
    parser.add_argument("--seed", type=int, default=0, help="random weights")
    args = parser.parse_args(argv)
    args.size = args.size or (20 if args.quick else 40)
    args.stride = args.stride or (6 if args.quick else 12)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup = build_setup(args)
    shape = setup.volume.shape
    brain = occluded_windows(shape, setup.size, setup.stride, setup.mask)
    common = _spread(brain, args.plain_windows)
    keep = {idx for idx, _ in _spread(brain, args.pilot_windows) + common}
    pilot = [w for w in brain if w[0] in keep]
    n_grid = len(window_grid(shape, setup.size, setup.stride))
    plain = _in_child(plain_worker, setup, common, n_grid)
    fast = _in_child(fast_worker, setup, pilot, len(brain), args.limit)
    _report(setup, plain, fast, n_grid, len(brain), common)


if __name__ == "__main__":
    main()
