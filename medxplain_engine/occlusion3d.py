"""3D occlusion with the seed's semantics, by incremental inference, skipping windows outside the brain.

Seed semantics (cnn-interpretability ``occlusion``): cube centres on a grid from 0 with step
``stride``; the cube spans ``[c - size//2, c + size//2)`` clipped at the borders and is filled with
0 (the training mean after z-scoring); relevance = p(unoccluded) - p(occluded) of the target
class, clipped at 0; the coarse grid is upsampled to the volume by nearest neighbour
(scipy ``zoom(order=0)``, as the seed's ``resize_image``).

Hand-written because Captum's ``Occlusion`` uses window starts rather than centres, cannot skip
windows and recomputes every layer in full: a window that holds no brain voxel leaves the (already
zero) input unchanged, so its relevance is exactly 0 and no forward pass is needed.

``occlusion_map`` uses incremental inference (Nakandala et al., SIGMOD 2019): a cube changes only
the activations in its projection through each layer, so the unoccluded activations are cached once
and, per window, only that box of every conv -> BN -> ReLU -> max-pool layer is recomputed from a
crop of the cached layer input with the recomputed box of the previous layer pasted in. Only the
cheap head sees the whole (patched) last-block map. The windows of a batch share one box extent
(boxes may only grow: extra outputs are recomputed from unchanged inputs); where a box grows to the
whole map (large cubes, deep layers) the crop is the whole map, i.e. that layer is recomputed in
full. Boxes are recomputed exactly, so the map equals the full recomputation
(``occlusion_map_reference``) up to float32 rounding.

Where it runs: a volume on the CPU is worked on as numpy arrays between convs (see ``_Cache``); a
volume on a GPU stays a torch tensor on that device throughout (the same crops, pastes and
BN/ReLU as in-place tensor ops, max-pooling by ``F.max_pool3d``), so no activation crosses to the
host and only the drops come back. ``incremental_drops(..., backend="torch")`` runs the tensor
path on the CPU too (the tests compare it with the numpy path there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import maximum_filter, zoom

from medxplain_engine.budget import TooExpensive
from medxplain_models.adni import CHANNELS, POOL_SIZES, ClassificationModel3D

DEFAULT_SIZE, DEFAULT_STRIDE = 40, 12  # the paper's figure (the seed's code defaults are 50 / 25)
MAX_PASSES = 20_000
KERNEL = 3  # every conv of ClassificationModel3D: k=3, stride 1, no padding
REFERENCE_BATCH = 4
CROP_BUDGET = 2**24  # block-1 output elements per incremental batch (64 MB in fp32)

Window = tuple[tuple[int, ...], tuple[slice, ...]]
Array = np.ndarray | torch.Tensor  # numpy on the CPU path, a tensor on the engine's device otherwise


def window_grid(shape: tuple[int, ...], size: int, stride: int) -> list[Window]:
    """(grid index, cube slices) for every centre of the seed's grid."""
    axes = [range(0, n, stride) for n in shape]
    half = size // 2
    out = []
    for idx in np.ndindex(*(len(a) for a in axes)):
        centre = [axes[d][i] for d, i in enumerate(idx)]
        out.append((idx, tuple(slice(max(c - half, 0), min(c + half, n)) for c, n in zip(centre, shape))))
    return out


def occluded_windows(shape: tuple[int, ...], size: int, stride: int,
                     brain_mask: np.ndarray | None = None) -> list[Window]:
    """The grid's windows that need a forward pass: those holding a brain voxel (all without a mask)."""
    grid = window_grid(shape, size, stride)
    if len(grid) > MAX_PASSES:
        raise TooExpensive("too_expensive", f"occlusion with stride {stride} needs {len(grid)} passes (limit {MAX_PASSES})")
    if brain_mask is None:
        return grid
    return [(idx, sl) for idx, sl in grid if brain_mask[sl].any()]


def relevance_map(shape: tuple[int, ...], stride: int, windows: list[Window], drops: np.ndarray) -> np.ndarray:
    """Probability drops of the computed windows -> clipped coarse grid -> nearest-neighbour upsampled map."""
    coarse = np.zeros(tuple(len(range(0, n, stride)) for n in shape), dtype=np.float32)
    for (idx, _), drop in zip(windows, drops):
        coarse[idx] = drop
    coarse = np.maximum(coarse, 0.0)
    return zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=0)


def _probability(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int) -> torch.Tensor:
    return torch.softmax(logits(x), dim=1)[:, target]


# --- reference: one full forward pass per window -------------------------------------------------

@torch.inference_mode()
def reference_drops(model: torch.nn.Module, volume: torch.Tensor, target: int, windows: list[Window],
                    batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """p(unoccluded) - p(occluded) per window, recomputing the whole network for every window."""
    base = float(_probability(model, volume, target)[0])
    drops = np.zeros(len(windows), dtype=np.float32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = volume.repeat(len(chunk), 1, 1, 1, 1)
        for b, (_, sl) in enumerate(chunk):
            batch[(b, 0, *sl)] = 0.0
        drops[start:start + len(chunk)] = base - _probability(model, batch, target).cpu().numpy()
    return drops


def occlusion_map_reference(model: torch.nn.Module, volume: torch.Tensor, target: int, size: int, stride: int,
                            brain_mask: np.ndarray | None = None, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """The straightforward map (full forward per window): what ``occlusion_map`` must reproduce."""
    shape = tuple(volume.shape[2:])
    windows = occluded_windows(shape, size, stride, brain_mask)
    return relevance_map(shape, stride, windows, reference_drops(model, volume, target, windows, batch_size))


# --- incremental inference -----------------------------------------------------------------------

@dataclass
class _Patch:
    """Recomputed boxes of one layer's map for a batch of windows (same extent for all, so they stack)."""

    lo: np.ndarray  # (B, 3) box corner in the layer's map (host integers on every device)
    values: Array  # (B, C, *extent)

    @property
    def extent(self) -> np.ndarray:
        return np.array(self.values.shape[2:])


@dataclass
class _Cache:
    """Activations of the unoccluded input: conv inputs x0..x3 and post-ReLU block outputs a1..a4.

    Held, and worked on between convs, as numpy arrays: crops, pastes, BN/ReLU and pooling are many
    small memory-bound ops, which numpy runs on one thread, while torch spreads each over its OpenMP
    pool and stalls whenever another process holds a core. On a GPU they are tensors on its device.
    """

    inputs: list[Array]  # (1, C, *n) each
    blocks: list[Array]


def _empty(like: Array, shape: tuple[int, ...]) -> Array:
    """An uninitialised map of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _as_tensor(x: Array) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _block(model: ClassificationModel3D, i: int, x: Array) -> Array:
    """``model.block(i, x)``: the conv in torch, then BatchNorm (eval: a per-channel affine map) and ReLU
    in place, which saves two copies of the largest maps."""
    bn = getattr(model, f"Conv_{i}_bn")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if not isinstance(x, np.ndarray):  # the tensor path: same affine map and ReLU, in place on the device
        y = getattr(model, f"Conv_{i}")(x)
        y.mul_(scale[:, None, None, None]).add_(shift[:, None, None, None])
        return y.clamp_(min=0)
    y = getattr(model, f"Conv_{i}")(torch.from_numpy(x)).numpy()
    np.multiply(y, scale.numpy()[:, None, None, None], out=y)
    np.add(y, shift.numpy()[:, None, None, None], out=y)
    return np.maximum(y, 0, out=y)


def _max_pool(x: Array, p: int) -> Array:
    """``MaxPool3d(p)`` of a map whose extent is a multiple of p, as p^3 strided maxima: 2-4x faster
    than torch's 3D max-pool, which also computes indices (tensors on a GPU use torch's)."""
    if not isinstance(x, np.ndarray):
        return F.max_pool3d(x, p)
    b, c, d, h, w = x.shape
    views = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    out = views[:, :, :, 0, :, 0, :, 0].copy()
    for i, j, k in np.ndindex(p, p, p):
        np.maximum(out, views[:, :, :, i, :, j, :, k], out=out)
    return out


def _full_block(model: ClassificationModel3D, i: int, x: Array) -> Array:
    """Block i on a whole (1, C, *n) map in slabs along the first axis (each with the conv's halo), at
    most CROP_BUDGET outputs at a time: a full-size conv's workspace is about twice its output."""
    c_out = getattr(model, f"Conv_{i}").out_channels
    d, h, w = (n - (KERNEL - 1) for n in x.shape[2:])
    out = _empty(x, (1, c_out, d, h, w))
    depth = max(CROP_BUDGET // (c_out * h * w), 1)
    for z in range(0, d, depth):
        out[:, :, z:z + depth] = _block(model, i, x[:, :, z:z + depth + KERNEL - 1])
    return out


def _cache_activations(model: ClassificationModel3D, volume: Array) -> _Cache:
    inputs, blocks = [volume], []
    for i, p in enumerate(POOL_SIZES, start=1):
        blocks.append(_full_block(model, i, inputs[-1]))
        if i < len(POOL_SIZES):
            inputs.append(_max_pool(blocks[-1][_box((0, 0, 0), np.array(blocks[-1].shape[2:]) // p * p)], p))
    return _Cache(inputs, blocks)


def _fit(lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Common box extent covering every window's [lo, hi), boxes shifted inside [0, n).

    Enlarging a box is harmless (its extra outputs are recomputed from unchanged inputs) and lets the
    batch be one tensor; an extent of at least 1 keeps the shapes valid when nothing is affected.
    """
    extent = np.maximum((hi - lo).max(axis=0), 1)
    return np.clip(np.minimum(lo, n - extent), 0, None), extent


def _box(lo: np.ndarray | tuple[int, ...], hi: np.ndarray) -> tuple:
    """Index of the box [lo, hi) in the last three (spatial) dimensions."""
    return (..., *(slice(a, z) for a, z in zip(lo, hi)))


def _crop(src: Array, lo: np.ndarray, extent: np.ndarray) -> Array:
    """(1, C, *n) map -> (B, C, *extent) boxes at the corners lo."""
    out = _empty(src, (len(lo), src.shape[1], *(int(e) for e in extent)))
    for b, corner in enumerate(lo):
        out[b] = src[0][_box(corner, corner + extent)]
    return out


def _paste(dst: Array, dst_lo: np.ndarray, patch: _Patch) -> None:
    """Copy each window's patch into its box dst (corner dst_lo), where the two overlap."""
    lo = np.maximum(dst_lo, patch.lo)
    hi = np.minimum(dst_lo + np.array(dst.shape[2:]), patch.lo + patch.extent)
    for b in range(len(lo)):
        if (hi[b] > lo[b]).all():
            dst[b][_box(lo[b] - dst_lo[b], hi[b] - dst_lo[b])] = patch.values[b][_box(lo[b] - patch.lo[b],
                                                                                       hi[b] - patch.lo[b])]


def _occlude(volume: Array, windows: list[Window]) -> _Patch:
    """The occluded input as a patch: the cubes' common box with the cubes set to 0."""
    lo = np.array([[s.start for s in sl] for _, sl in windows])
    hi = np.array([[s.stop for s in sl] for _, sl in windows])
    box_lo, extent = _fit(lo, hi, np.array(volume.shape[2:]))
    values = _crop(volume, box_lo, extent)
    for b in range(len(windows)):
        values[b][_box(lo[b] - box_lo[b], hi[b] - box_lo[b])] = 0.0
    return _Patch(box_lo, values)


def _conv_step(model: ClassificationModel3D, i: int, src: Array, patch: _Patch) -> _Patch:
    """Block i (valid conv -> BN -> ReLU) on the box its output changes in: output o reads inputs o..o+2."""
    n_out = np.array(src.shape[2:]) - (KERNEL - 1)
    lo, extent = _fit(np.maximum(patch.lo - (KERNEL - 1), 0), np.minimum(patch.lo + patch.extent, n_out), n_out)
    crop = _crop(src, lo, extent + KERNEL - 1)
    _paste(crop, lo, patch)
    return _Patch(lo, _block(model, i, crop))


def _pool_step(model: ClassificationModel3D, i: int, src: Array, patch: _Patch) -> _Patch:
    """Max-pool i on every window it overlaps; trailing inputs beyond the last full window are dropped."""
    p = POOL_SIZES[i - 1]
    n_out = np.array(src.shape[2:]) // p
    hi = np.minimum(-(-(patch.lo + patch.extent) // p), n_out)
    lo, extent = _fit(patch.lo // p, hi, n_out)
    crop = _crop(src, lo * p, extent * p)
    _paste(crop, lo * p, patch)
    return _Patch(lo, _max_pool(crop, p))


def _occluded_probability(model: ClassificationModel3D, cache: _Cache, windows: list[Window],
                          target: int) -> np.ndarray:
    """p(target) with each window's cube occluded, recomputing only the affected boxes up to block 4."""
    patch = _occlude(cache.inputs[0], windows)
    for i in range(1, len(POOL_SIZES) + 1):
        patch = _conv_step(model, i, cache.inputs[i - 1], patch)
        if i < len(POOL_SIZES):
            patch = _pool_step(model, i, cache.blocks[i - 1], patch)
    last = cache.blocks[-1]
    features = np.repeat(last, len(windows), axis=0) if isinstance(last, np.ndarray) else last.repeat(
        len(windows), 1, 1, 1, 1)
    _paste(features, np.zeros_like(patch.lo), patch)
    return _probability(model.head, _as_tensor(features), target).cpu().numpy()


def default_batch_size(device: torch.device | None = None) -> int:
    """Windows per incremental batch. On one thread, 4 keeps the crops in cache (measured: 6 ms per
    window vs 11 at 16); with more threads every small op is an OpenMP fork/join, which larger
    batches amortise (2 threads: 18 ms at 16 vs 39 at 4, on a 2-core machine with other load).
    On a GPU every op is a kernel launch: 32 (not tuned on hardware; ``_batch_limit`` still caps the
    crops' memory at CROP_BUDGET)."""
    if device is not None and device.type != "cpu":
        return 32
    return 4 if torch.get_num_threads() == 1 else 16


def _batch_limit(windows: list[Window], shape: np.ndarray, batch_size: int) -> int:
    """Windows per batch, capped so the batch's block-1 output stays under CROP_BUDGET elements.

    Large cubes project onto most of the first maps (265 MB per copy at the seed's grid); they then
    go one at a time, which is as much memory as one full forward pass.
    """
    cube = np.array([[s.stop - s.start for s in sl] for _, sl in windows]).max(axis=0)
    box = np.minimum(cube + KERNEL - 1, shape - (KERNEL - 1))
    per_window = CHANNELS[1] * int(np.prod(box))
    return int(np.clip(CROP_BUDGET // per_window, 1, batch_size))


@torch.inference_mode()
def incremental_drops(model: ClassificationModel3D, volume: torch.Tensor, target: int, windows: list[Window],
                      batch_size: int | None = None, backend: str | None = None) -> np.ndarray:
    """p(unoccluded) - p(occluded) per window, by incremental inference (same values as ``reference_drops``).

    ``backend``: "numpy" (the CPU default) or "torch" (tensors on the volume's device, the default off
    the CPU); the model must be on the volume's device."""
    if model.training:
        raise ValueError("incremental occlusion needs the model in eval mode (BatchNorm must be per-channel affine)")
    drops = np.zeros(len(windows), dtype=np.float32)
    if not windows:
        return drops
    backend = backend or ("numpy" if volume.device.type == "cpu" else "torch")
    if backend not in ("numpy", "torch") or (backend == "numpy" and volume.device.type != "cpu"):
        raise ValueError("backend must be 'torch', or 'numpy' for a volume on the CPU")
    start_map = volume.detach().float().contiguous()
    cache = _cache_activations(model, start_map.numpy() if backend == "numpy" else start_map)
    base = float(_probability(model.head, _as_tensor(cache.blocks[-1]), target)[0])
    step = _batch_limit(windows, np.array(volume.shape[2:]), batch_size or default_batch_size(volume.device))
    for start in range(0, len(windows), step):
        chunk = windows[start:start + step]
        drops[start:start + len(chunk)] = base - _occluded_probability(model, cache, chunk, target)
    return drops


def occlusion_map(model: ClassificationModel3D, volume: torch.Tensor, target: int, size: int, stride: int,
                  brain_mask: np.ndarray | None = None, batch_size: int | None = None) -> np.ndarray:
    """volume: (1, 1, D, H, W) normalised input -> relevance map (D, H, W)."""
    shape = tuple(volume.shape[2:])
    windows = occluded_windows(shape, size, stride, brain_mask)
    return relevance_map(shape, stride, windows, incremental_drops(model, volume, target, windows, batch_size))


def brain_hits(shape: tuple[int, ...], size: int, brain_mask: np.ndarray | None) -> np.ndarray | None:
    """Voxels whose cube holds a brain voxel: the mask dilated by the cube (scipy's even-size maximum
    filter spans [c - size//2, c + size//2), the seed's cube)."""
    if brain_mask is None:
        return None
    return maximum_filter(brain_mask.astype(np.uint8), size=max(1, 2 * (size // 2)), mode="constant")


def window_count(shape: tuple[int, ...], stride: int, hits: np.ndarray | None) -> int:
    """How many windows ``occluded_windows`` returns, without building them (all grid windows past MAX_PASSES)."""
    grid = int(np.prod([len(range(0, n, stride)) for n in shape]))
    if hits is None or grid > MAX_PASSES:
        return grid
    return int(hits[tuple(slice(0, n, stride) for n in shape)].sum())


def incremental_fraction(shape: tuple[int, ...], size: int) -> float:
    """Share of a full forward pass one window costs by incremental inference: its box in the first block."""
    return float(max(0.01, np.prod([min(1.0, (min(size, n) + 2 * (KERNEL - 1)) / n) for n in shape])))


class Occlusion3D:
    name = "occlusion"
    description = "occlusion (seed semantics): probability drop when a cube is set to 0, clipped at 0; windows outside the brain skipped"
    online = True

    @staticmethod
    def settings(voxel_mm: float, options) -> tuple[int, int]:
        # Defaults are the seed's millimetres (its grid was 1 mm); on a coarser grid they shrink in voxels.
        size = options.occlusion_size or max(1, round(DEFAULT_SIZE / voxel_mm))
        stride = options.occlusion_stride or max(1, round(DEFAULT_STRIDE / voxel_mm))
        return size, stride

    def passes(self, cost, options) -> float:
        size, stride = self.settings(cost.voxel_mm, options)
        windows = window_count(cost.spatial, stride, brain_hits(cost.spatial, size, cost.brain_mask))
        return 1.0 + windows * incremental_fraction(cost.spatial, size)

    def fitting(self, cost, options, allowed) -> str | None:
        size, stride = self.settings(cost.voxel_mm, options)
        hits, per_window = brain_hits(cost.spatial, size, cost.brain_mask), incremental_fraction(cost.spatial, size)
        for wider in range(stride, 257):
            if 1.0 + window_count(cost.spatial, wider, hits) * per_window <= allowed:
                return f"occlusion_stride>={wider} (size {size})"
        return None

    def attribute(self, ctx, target, options) -> np.ndarray:
        size, stride = self.settings(ctx.voxel_mm, options)
        model = ctx.score_model.model  # the raw logits model; softmax is applied here
        return occlusion_map(model, ctx.inputs, target, size, stride, ctx.brain_mask)
