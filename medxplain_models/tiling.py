"""DeepMiner-style patch tiling of full mammograms.

Shared by training and by the batch job, so everything here is pure (no I/O) and
works for any image size: tiles are squares of a quarter of the shorter image
side, overlapping by half a tile, and every tile is resized to ``PATCH_SIZE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

PATCH_SIZE = 227


@dataclass(frozen=True)
class Tile:
    """Square box ``[y, y+size) x [x, x+size)`` in full-image pixel coordinates."""

    y: int
    x: int
    size: int


@dataclass(frozen=True)
class Components:
    """Connected lesions of a class mask, computed once per image.

    ``labels`` numbers every connected region of each class separately (regions of
    different classes never share a number, even when they touch) and
    ``sizes[k]`` is the pixel count of region ``k`` (``sizes[0] == 0``).
    """

    labels: np.ndarray
    sizes: np.ndarray


def _positions(length: int, side: int, stride: int) -> list[int]:
    """Tile origins along one axis; the last tile is aligned to the border."""
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts


def tile_grid(height: int, width: int) -> list[Tile]:
    """All tiles of an image, row-major.

    Side is ``min(height, width) // 4`` and stride half a side, so each point of
    the image lies in up to four tiles and a lesion is seen whole by at least one
    tile whenever it is smaller than half a tile.
    """
    side = min(height, width) // 4
    if side < 2:
        raise ValueError(f"image {height}x{width} is too small to tile")
    stride = side // 2
    return [Tile(y, x, side) for y in _positions(height, side, stride) for x in _positions(width, side, stride)]


def label_components(mask: np.ndarray) -> Components:
    """Label the connected lesions of every class of ``mask`` (see ``Components``)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    offset = 0
    for cls in np.unique(mask[mask > 0]):
        cls_labels, n = ndimage.label(mask == cls)
        labels[cls_labels > 0] = cls_labels[cls_labels > 0] + offset
        offset += n
    sizes = np.bincount(labels.ravel(), minlength=offset + 1)
    sizes[0] = 0
    return Components(labels=labels, sizes=sizes)


def tile_label(
    mask: np.ndarray,
    tile: Tile,
    min_lesion_fraction: float = 0.5,
    min_patch_fraction: float = 0.05,
    components: Components | None = None,
) -> int:
    """Class of a tile from the lesion mask (pixel value = class index).

    The label is the highest class ``c`` for which either

    * the tile holds at least ``min_lesion_fraction`` of all class-``c`` pixels of
      the connected lesion(s) it touches, or
    * class-``c`` pixels cover at least ``min_patch_fraction`` of the tile.

    The first rule lets a small lesion (e.g. a calcification cluster covering 1 %
    of the tile) label the patch that contains it; the second lets a large mass
    label the tiles that show a substantial part of it, while neighbours that only
    graze its rim stay normal. Pass ``components`` (from ``label_components``) when
    labelling many tiles of one image, to avoid relabelling the mask each time.
    """
    if components is None:
        components = label_components(mask)
    window = (slice(tile.y, tile.y + tile.size), slice(tile.x, tile.x + tile.size))
    sub = mask[window]
    sub_labels = components.labels[window]
    for cls in np.unique(sub[sub > 0])[::-1]:
        inside = sub == cls
        n_inside = int(inside.sum())
        touched = np.unique(sub_labels[inside])
        if n_inside >= min_lesion_fraction * components.sizes[touched].sum():
            return int(cls)
        if n_inside >= min_patch_fraction * tile.size * tile.size:
            return int(cls)
    return 0


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """Scale an integer image to float32 in [0, 1]; floats are assumed already there."""
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    raise TypeError(f"unsupported image dtype {image.dtype}")


def extract_patch(image: np.ndarray, tile: Tile, size: int = PATCH_SIZE) -> np.ndarray:
    """Crop ``tile`` from a 2-D image and resize it to ``size`` x ``size``.

    Uses PIL bilinear resampling, which low-pass filters when shrinking, so fine
    calcifications survive as blurred specks instead of aliasing away. Returns
    float32 in [0, 1] (uint16 / 65535, uint8 / 255).
    """
    crop = _to_unit_float(image[tile.y : tile.y + tile.size, tile.x : tile.x + tile.size])
    if crop.shape != (size, size):
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return np.clip(crop, 0.0, 1.0).astype(np.float32, copy=False)
