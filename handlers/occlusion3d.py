"""3D occlusion with the seed's semantics, batched and skipping windows outside the brain.

Seed semantics (cnn-interpretability ``occlusion``): cube centres on a grid from 0 with step
``stride``; the cube spans ``[c - size//2, c + size//2)`` clipped at the borders and is filled with
0 (the training mean after z-scoring); relevance = p(unoccluded) - p(occluded) of the target
class, clipped at 0; the coarse grid is upsampled to the volume by nearest neighbour
(scipy ``zoom(order=0)``, as the seed's ``resize_image``).

Hand-written because Captum's ``Occlusion`` uses window starts rather than centres and cannot skip
windows: a window that holds no brain voxel leaves the (already zero) input unchanged, so its
relevance is exactly 0 and no forward pass is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import zoom

from handlers.errors import InputError

DEFAULT_SIZE, DEFAULT_STRIDE = 40, 12  # the paper's figure (the seed's code defaults are 50 / 25)
MAX_PASSES = 20_000


def window_grid(shape: tuple[int, ...], size: int, stride: int) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(grid index, cube slices) for every centre of the seed's grid."""
    axes = [range(0, n, stride) for n in shape]
    half = size // 2
    out = []
    for idx in np.ndindex(*(len(a) for a in axes)):
        centre = [axes[d][i] for d, i in enumerate(idx)]
        out.append((idx, tuple(slice(max(c - half, 0), min(c + half, n)) for c, n in zip(centre, shape))))
    return out


def _probability(model: torch.nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    return torch.softmax(model(x), dim=1)[:, target]


@torch.inference_mode()
def occlusion_map(model: torch.nn.Module, volume: torch.Tensor, target: int, size: int, stride: int,
                  brain_mask: np.ndarray | None = None, batch_size: int = 4) -> np.ndarray:
    """volume: (1, 1, D, H, W) normalised input -> relevance map (D, H, W)."""
    shape = tuple(volume.shape[2:])
    grid = window_grid(shape, size, stride)
    if len(grid) > MAX_PASSES:
        raise InputError("too_expensive", f"occlusion with stride {stride} needs {len(grid)} passes (limit {MAX_PASSES})")
    coarse = np.zeros(tuple(len(range(0, n, stride)) for n in shape), dtype=np.float32)
    if brain_mask is not None:
        grid = [(idx, sl) for idx, sl in grid if brain_mask[sl].any()]
    base = float(_probability(model, volume, target)[0])
    for start in range(0, len(grid), batch_size):
        chunk = grid[start:start + batch_size]
        batch = volume.repeat(len(chunk), 1, 1, 1, 1)
        for b, (_, sl) in enumerate(chunk):
            batch[(b, 0, *sl)] = 0.0
        probs = _probability(model, batch, target).numpy()
        for (idx, _), p in zip(chunk, probs):
            coarse[idx] = base - p
    coarse = np.maximum(coarse, 0.0)
    return zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=0)


class Occlusion3D:
    name = "occlusion"
    description = "occlusion (seed semantics): probability drop when a cube is set to 0, clipped at 0; windows outside the brain skipped"
    online = True

    def attribute(self, ctx, target, options) -> np.ndarray:
        size = options.occlusion_size or DEFAULT_SIZE
        stride = options.occlusion_stride or DEFAULT_STRIDE
        model = ctx.score_model.model  # the raw logits model; softmax is applied here
        return occlusion_map(model, ctx.inputs, target, size, stride, ctx.brain_mask)
