"""Deterministic synthetic mammography with ground-truth lesion masks.

Stands in for DDSM, which cannot be downloaded: cases of four views
(LEFT/RIGHT x CC/MLO), case classes normal / benign / malignant, masks whose pixel
value is the class index, and a DeepMiner patch set built from them.

Images are drawn in a canonical frame with the chest wall on the left edge and
flipped for RIGHT breasts, so LEFT breasts have the chest wall on the left and
RIGHT breasts on the right (the back-to-back reading layout). Appearance follows
BI-RADS descriptors so benign and malignant are separable by shape, as in real
reading: benign = circumscribed round/oval masses or a few coarse calcifications;
malignant = spiculated or irregular ill-defined masses or clusters of fine
pleomorphic calcifications. Everything is vectorised numpy/scipy; a 1400x908 view
takes a few hundred milliseconds.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage
from scipy.spatial import ConvexHull
from tqdm import tqdm

from medxplain_models.tiling import PATCH_SIZE, extract_patch, label_components, tile_grid, tile_label

GENERATOR_NAME = "medxai-synth-mammo"
DETECTOR_HEIGHT_MM = 210.0  # nominal detector height of the DICOM copies: ImagerPixelSpacing = this / rows
VERSION = "1.0.0"
CLASS_NAMES = ("normal", "benign", "malignant")
SIDES = ("LEFT", "RIGHT")
VIEWS = ("CC", "MLO")
LESION_KINDS = {
    1: ("mass_round", "mass_oval", "coarse_calcification"),
    2: ("mass_spiculated", "mass_irregular", "fine_pleomorphic_cluster"),
}
_REFERENCE_SIDE = 908.0  # lesion sizes below are in pixels at this shorter image side

# Spawn-key tags: every RNG is SeedSequence(seed, spawn_key=(tag, index)), fixed
# length so no two streams can coincide and no result depends on generation order.
_CASE, _VIEW, _SPLIT, _PATCH = 1, 2, 3, 4


def _rng(seed: int, tag: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(tag, index)))


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    """Breast geometry of one view in the canonical frame (chest wall at x = 0).

    ``skin_dist`` is the approximate distance in pixels to the skin line (negative
    outside the breast), ``rho`` the elliptic radius (0 at the chest-wall centre,
    about 1 at the skin) and ``muscle_dist`` the signed distance to the pectoral
    muscle edge (positive inside the muscle, -inf for CC views).
    """

    skin_dist: np.ndarray
    rho: np.ndarray
    muscle_dist: np.ndarray
    nipple: tuple[float, float]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~``scale`` pixels.

    Drawn on a coarse grid and upsampled bicubically, which is far cheaper than
    filtering full-resolution noise with a wide Gaussian.
    """
    h, w = shape
    coarse = (max(3, int(np.ceil(h / scale)) + 2), max(3, int(np.ceil(w / scale)) + 2))
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), 0.7).astype(np.float32)
    field = np.asarray(Image.fromarray(noise).resize((w, h), Image.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _radial_wobble(rng: np.random.Generator, theta: np.ndarray, amplitude: float, k_max: int) -> np.ndarray:
    """Smooth random radius multiplier ``1 + sum_k a_k cos(k theta + p_k)``."""
    k = np.arange(2, k_max + 1, dtype=np.float32)
    amp = rng.normal(0.0, amplitude, k.size).astype(np.float32) / np.sqrt(k - 1)
    phase = rng.uniform(0.0, 2 * np.pi, k.size).astype(np.float32)
    table_theta = np.linspace(-np.pi, np.pi, 721, dtype=np.float32)
    table = 1 + (amp[:, None] * np.cos(k[:, None] * table_theta + phase[:, None])).sum(0)
    return np.interp(theta, table_theta, table).astype(np.float32)


def _anatomy(rng: np.random.Generator, view: str, h: int, w: int) -> _Anatomy:
    """Half-ellipse breast on the chest wall; MLO adds the axillary tail and pectoralis."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if view == "CC":
        cy = h * rng.uniform(0.46, 0.54)
        a_top = h * rng.uniform(0.33, 0.4)
        a_bottom = a_top * rng.uniform(0.92, 1.08)
    else:  # MLO: the breast runs off the top edge into the axilla
        cy = h * rng.uniform(0.48, 0.56)
        a_top = h * rng.uniform(0.6, 0.7)
        a_bottom = h * rng.uniform(0.3, 0.38)
    b = w * rng.uniform(0.62, 0.82)
    a = np.where(yy < cy, a_top, a_bottom).astype(np.float32)
    u = (yy - cy) / a
    v = xx / b
    rho = np.sqrt(u * u + v * v)
    edge = _radial_wobble(rng, np.arctan2(u, v), 0.025, 6)
    grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.maximum(rho, 1e-3)
    skin_dist = (edge - rho) / np.maximum(grad, 1e-6)

    muscle_dist = np.full((h, w), -np.inf, dtype=np.float32)
    if view == "MLO":
        top_width = b * np.sqrt(max(0.0, 1 - (cy / a_top) ** 2))
        px = top_width * rng.uniform(0.6, 0.9)
        py = h * rng.uniform(0.35, 0.55)
        bow = rng.uniform(-0.35, 0.1)  # < 0 bulges the muscle edge outwards, as usual
        s = xx / px + yy / py + bow * (xx / px) * (yy / py)
        grad_s = np.hypot(1 / px + bow * yy / (px * py), 1 / py + bow * xx / (px * py))
        muscle_dist = ((1 - s) / grad_s).astype(np.float32)
    nipple = (float(cy), float(b * edge[int(cy), w - 1]))  # theta = 0 on the centre row
    return _Anatomy(skin_dist.astype(np.float32), rho.astype(np.float32), muscle_dist, nipple)


def _strands(rng: np.random.Generator, anatomy: _Anatomy) -> np.ndarray:
    """Thin, slightly wavy fibrous strands and ducts converging on the nipple, in [0, 1].

    Noise smoothed along the radius but not across it, sampled in polar
    coordinates around the nipple (with a smooth angular warp so strands curve),
    gives streaks that fan out towards the chest wall like Cooper's ligaments and
    ducts.
    """
    h, w = anatomy.rho.shape
    ny, nx = anatomy.nipple
    yy = np.arange(h, dtype=np.float32)[:, None] - ny
    xx = nx - np.arange(w, dtype=np.float32)[None, :]
    n_r, n_phi = 90, 1400
    r_max = float(np.hypot(h, w))
    noise = ndimage.gaussian_filter(rng.standard_normal((n_r, n_phi)), (2.0, 0.9), mode=("nearest", "wrap")).astype(
        np.float32
    )
    noise /= noise.std()
    warp = 0.015 * _smooth_field(rng, (h, w), 0.15 * min(h, w))
    coords = np.stack(
        np.broadcast_arrays(
            np.hypot(yy, xx) * ((n_r - 1) / r_max),
            (np.arctan2(yy, xx) + warp + np.pi) * (n_phi / (2 * np.pi)),
        )
    )
    streaks = ndimage.map_coordinates(noise, coords, order=1, mode="nearest")
    return np.clip((streaks - 1.5) / 1.5, 0, 1)


def _tissue(rng: np.random.Generator, anatomy: _Anatomy, density: float) -> np.ndarray:
    """Fibroglandular density in [0, 1].

    Glands sit in a central cone behind the nipple, with a fatty subcutaneous layer
    and retroglandular fat; ``density`` (about -1 fatty .. +1 dense) shifts the
    amount of glandular tissue, like the BI-RADS breast density categories. Fine
    fields break the glands into cotton-like lobules interspersed with fat.
    """
    h, w = anatomy.rho.shape
    side = min(h, w)
    depth = np.clip(anatomy.skin_dist / (0.06 * side), 0, 1)
    cone = np.exp(-(((anatomy.rho - 0.45) / 0.32) ** 2)) * depth
    texture = (
        0.6 * _smooth_field(rng, (h, w), 0.10 * side)
        + 0.3 * _smooth_field(rng, (h, w), 0.035 * side)
        + 0.15 * _smooth_field(rng, (h, w), 0.012 * side)
    )
    gland = depth / (1 + np.exp(-(texture + 2.5 * cone - 1.8 + density) / 0.55))
    lobules = 0.8 + 0.2 * np.tanh(_smooth_field(rng, (h, w), 0.02 * side))
    fine = 1 + 0.06 * _smooth_field(rng, (h, w), 0.004 * side)
    return np.clip(0.9 * gland * lobules * fine + 0.2 * _strands(rng, anatomy) * depth, 0, 1)


# --------------------------------------------------------------------------- lesions
# Each renderer returns (density, mask) on a square crop centred on the lesion;
# sizes are pixels at a 908-pixel shorter side, multiplied by ``scale``.


def _local_grid(radius: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float32)
    return y, x


def _disc_points(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """``n`` points uniform in a disc, shape (n, 2) as (y, x)."""
    r = radius * np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.sin(t), r * np.cos(t)], axis=1).astype(np.float32)


def _hull_mask(spots: np.ndarray, margin: float) -> np.ndarray:
    """Convex hull of ``spots`` dilated by ``margin``: how clusters are outlined."""
    pixels = np.argwhere(spots).astype(np.float64)
    corners = (pixels[:, None, :] + [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]).reshape(-1, 2)
    equations = ConvexHull(corners).equations
    grid = np.indices(spots.shape).reshape(2, -1).T
    inside = (grid @ equations[:, :2].T + equations[:, 2] <= 1e-9).all(axis=1)
    return ndimage.distance_transform_edt(~inside.reshape(spots.shape)) <= margin


def _circumscribed_mass(
    rng: np.random.Generator, ry: float, rx: float, angle: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth-bordered dense mass with a thin radiolucent halo (benign signs)."""
    radius = int(np.ceil(max(ry, rx) * 1.25 + 4 * scale)) + 2
    y, x = _local_grid(radius)
    yr = y * np.cos(angle) + x * np.sin(angle)
    xr = -y * np.sin(angle) + x * np.cos(angle)
    theta = np.arctan2(yr / ry, xr / rx)
    dn = np.hypot(yr / ry, xr / rx) / _radial_wobble(rng, theta, 0.03, 4)
    body = ndimage.gaussian_filter(np.clip(1 - dn**2, 0, 1) ** 0.3, max(0.7, 1.2 * scale))
    texture = 1 + 0.04 * _smooth_field(rng, body.shape, max(3.0, 8 * scale))
    halo = np.exp(-(((dn - 1.1) / 0.05) ** 2))
    return rng.uniform(0.2, 0.28) * body * texture - 0.03 * halo, dn <= 1


def _mass_round(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    r = rng.uniform(28, 50) * scale
    return _circumscribed_mass(rng, r, r, 0.0, scale)


def _mass_oval(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    r = rng.uniform(24, 40) * scale
    return _circumscribed_mass(rng, r * rng.uniform(1.35, 1.9), r, rng.uniform(0, np.pi), scale)


def _coarse_calcification(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One to four large popcorn or rim ("eggshell") calcifications."""
    n = int(rng.integers(1, 5))
    spread = rng.uniform(10, 35) * scale
    radii = np.maximum(rng.uniform(4.5, 10, n) * scale, 1.5)
    radius = int(spread + 1.6 * radii.max() + 8 * scale) + 3
    y, x = _local_grid(radius)
    density = np.zeros_like(y)
    for (cy, cx), r in zip(_disc_points(rng, n, spread), radii):
        dy, dx = y - cy, x - cx
        dn = np.hypot(dy, dx) / (r * _radial_wobble(rng, np.arctan2(dy, dx), 0.12, 5))
        if rng.random() < 0.3:
            shape = np.exp(-(((dn - 0.8) / 0.2) ** 2)) * (dn < 1.15)
        else:
            shape = np.clip(1 - dn**2, 0, 1) ** 0.25
        density = np.maximum(density, rng.uniform(0.38, 0.5) * shape)
    density = ndimage.gaussian_filter(density, max(0.5, 0.8 * scale))
    return density, _hull_mask(density > 0.1, 6 * scale)


def _mass_spiculated(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense irregular core with thin spicules radiating out of it."""
    r = rng.uniform(20, 36) * scale
    n = int(rng.integers(10, 24))
    lengths = r * rng.uniform(2.0, 3.5, n)
    radius = int(lengths.max() + 4 * scale) + 2
    y, x = _local_grid(radius)
    d = np.hypot(y, x)
    theta = np.arctan2(y, x)
    dn = d / (r * _radial_wobble(rng, theta, 0.1, 8))
    core = ndimage.gaussian_filter(np.clip(1 - dn**2, 0, 1) ** 0.4, max(0.8, 2.5 * scale))
    spicules = np.zeros_like(d)
    params = zip(
        rng.uniform(0, 2 * np.pi, n),
        lengths,
        rng.uniform(0.9, 2.0, n) * max(scale, 0.5),
        rng.uniform(0.1, 0.18, n),
        rng.normal(0, 0.12, n),
    )
    for angle, length, width, amp, bend in params:
        delta = (theta - angle - bend * (d / length) ** 2 + np.pi) % (2 * np.pi) - np.pi
        taper = np.sqrt(np.clip((length - d) / (length - 0.6 * r), 0, 1))
        line = np.exp(-((d * np.abs(np.sin(delta)) / (width * (0.3 + 0.7 * taper))) ** 2))
        spicules = np.maximum(spicules, amp * line * taper * (np.cos(delta) > 0))
    rim = np.clip((dn - 0.6) / 0.4, 0, 1)  # spicules grow out of the core's margin
    return rng.uniform(0.24, 0.32) * core + spicules * rim, dn <= 1.15


def _mass_irregular(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lobulated, jagged, heterogeneous mass with blurred (indistinct) margins."""
    r = rng.uniform(32, 52) * scale
    radius = int(1.6 * r + 10 * scale) + 2
    y, x = _local_grid(radius)
    n = int(rng.integers(3, 7))
    offsets = _disc_points(rng, n, 0.55 * r)[:, :, None, None]
    lobe_r = r * rng.uniform(0.45, 0.8, n)[:, None, None]
    lobes = 1 - ((y - offsets[:, 0]) ** 2 + (x - offsets[:, 1]) ** 2) / lobe_r**2
    # Bounded noise roughens the margin but can never erase a lobe's centre (value 1).
    shape = lobes.max(axis=0) + 0.35 * np.tanh(_smooth_field(rng, y.shape, max(2.0, 0.25 * r)))
    labels, _ = ndimage.label(shape > 0)
    mask = ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    body = ndimage.gaussian_filter(np.clip(shape, 0, 1) ** 0.5 * mask, max(1.0, 3.5 * scale))
    texture = 1 + 0.12 * _smooth_field(rng, y.shape, max(2.0, 6 * scale))
    return rng.uniform(0.26, 0.34) * body * texture, mask


def _fine_pleomorphic_cluster(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Many tiny bright specks of varied shape (dots, short linear forms) in a cluster."""
    n = int(rng.integers(12, 36))
    spread = rng.uniform(16, 38) * scale
    elongation = rng.uniform(1.0, 2.5)
    angle = rng.uniform(0, np.pi)
    radius = int(spread * np.sqrt(elongation) + 12 * scale) + 4
    y, x = _local_grid(radius)
    unit = _disc_points(rng, n, 1.0) * [spread * np.sqrt(elongation), spread / np.sqrt(elongation)]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    centres = (unit @ rot.T)[:, :, None, None]
    speck = max(scale, 0.4)
    major = np.maximum(rng.uniform(0.7, 2.6, n) * speck, 0.6)[:, None, None]
    minor = np.maximum(rng.uniform(0.6, 1.0, n) * speck, 0.6)[:, None, None]
    orient = rng.uniform(0, np.pi, n)[:, None, None]
    dy, dx = y - centres[:, 0], x - centres[:, 1]
    along = dy * np.cos(orient) + dx * np.sin(orient)
    across = -dy * np.sin(orient) + dx * np.cos(orient)
    amp = rng.uniform(0.3, 0.55, n)[:, None, None]
    density = np.clip((amp * np.exp(-0.5 * ((along / major) ** 2 + (across / minor) ** 2))).sum(0), 0, 0.6)
    return density, _hull_mask(density > 0.08, 5 * scale)


_RENDERERS: dict[str, Callable[[np.random.Generator, float], tuple[np.ndarray, np.ndarray]]] = {
    "mass_round": _mass_round,
    "mass_oval": _mass_oval,
    "coarse_calcification": _coarse_calcification,
    "mass_spiculated": _mass_spiculated,
    "mass_irregular": _mass_irregular,
    "fine_pleomorphic_cluster": _fine_pleomorphic_cluster,
}


def _place(
    rng: np.random.Generator, anatomy: _Anatomy, extent: int, taken: list[tuple[int, int, int]]
) -> tuple[int, int] | None:
    """Random centre whose whole crop lies inside the breast, off the pectoralis and
    away from already placed lesions; None if there is no room."""
    h, w = anatomy.rho.shape
    step = 4
    margin = extent + 0.02 * min(h, w)
    ys = np.arange(0, h, step)[:, None]
    xs = np.arange(0, w, step)[None, :]
    ok = (
        (anatomy.skin_dist[::step, ::step] >= margin)
        & (anatomy.muscle_dist[::step, ::step] <= -margin)
        & (ys >= extent)
        & (ys < h - extent)
        & (xs >= extent)
        & (xs < w - extent)
    )
    for ty, tx, te in taken:
        ok &= np.hypot(ys - ty, xs - tx) > extent + te
    candidates = np.argwhere(ok)
    if not len(candidates):
        return None
    cy, cx = candidates[rng.integers(len(candidates))] * step
    return int(cy), int(cx)


def _add_lesions(
    rng: np.random.Generator, anatomy: _Anatomy, label: int, kinds: Sequence[str], scale: float
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render and place lesions of ``kinds``; shrink a lesion that finds no room."""
    h, w = anatomy.rho.shape
    density = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    records: list[dict] = []
    taken: list[tuple[int, int, int]] = []
    for kind in kinds:
        for attempt in range(4):
            patch, patch_mask = _RENDERERS[kind](rng, scale * 0.8**attempt)
            extent = patch.shape[0] // 2
            centre = _place(rng, anatomy, extent, taken)
            if centre is not None:
                break
        else:
            raise RuntimeError(f"no room for a {kind} in a {h}x{w} view")
        cy, cx = centre
        window = (slice(cy - extent, cy + extent + 1), slice(cx - extent, cx + extent + 1))
        density[window] += patch
        mask[window][patch_mask] = label
        taken.append((cy, cx, extent))
        ys, xs = np.nonzero(patch_mask)
        records.append(
            {
                "kind": kind,
                "class": label,
                "class_name": CLASS_NAMES[label],
                "bbox": [
                    int(cy - extent + ys.min()),
                    int(cx - extent + xs.min()),
                    int(cy - extent + ys.max() + 1),
                    int(cx - extent + xs.max() + 1),
                ],
                "centre": [cy, cx],
                "area": int(patch_mask.sum()),
            }
        )
    return density, mask, records


# --------------------------------------------------------------------------- views


def _compose(
    rng: np.random.Generator, anatomy: _Anatomy, tissue: np.ndarray, lesions: np.ndarray, scale: float
) -> np.ndarray:
    """Intensity image in [0, 1]: dense = bright (MONOCHROME2), air ~ 0.

    Brightness falls off towards the skin where the compressed breast thins; the
    pectoralis is a bright band; the skin is a thin brighter line.
    """
    h, w = tissue.shape
    side = min(h, w)
    inside = np.clip(anatomy.skin_dist + 0.5, 0, 1)
    thickness = np.clip(anatomy.skin_dist / (0.07 * side), 0, 1) ** 0.5
    level = 0.12 + thickness * (0.2 + 0.36 * tissue + lesions)
    muscle = 1 / (1 + np.exp(-np.clip(anatomy.muscle_dist / max(1.5 * scale, 0.7), -30, 30)))
    muscle_level = (
        0.6
        + 0.08 * np.clip(anatomy.muscle_dist / (0.1 * side), 0, 1)
        + 0.03 * _smooth_field(rng, (h, w), 0.03 * side)
        + 0.015 * _smooth_field(rng, (h, w), 0.006 * side)
    )
    level = level + muscle * (muscle_level - level)
    skin = 0.05 * np.exp(-((anatomy.skin_dist / max(1.2 * scale, 0.6)) ** 2))
    noise = rng.standard_normal((h, w), dtype=np.float32)
    image = inside * (level + skin) + (1 - inside) * 0.01 + noise * (0.002 + 0.006 * inside)
    return np.clip(image, 0, 1)


def _to_uint16(image: np.ndarray) -> np.ndarray:
    """Quantise to 12 bits like a detector, then bit-replicate to the 16-bit range."""
    v12 = np.round(image * 4095).astype(np.uint16)
    return (v12 << 4) | (v12 >> 8)


def _flip_record(record: dict, width: int) -> dict:
    y0, x0, y1, x1 = record["bbox"]
    cy, cx = record["centre"]
    return {**record, "bbox": [y0, width - x1, y1, width - x0], "centre": [cy, width - 1 - cx]}


def generate_view(
    rng: np.random.Generator,
    label: int,
    side: str,
    view: str,
    height: int,
    width: int,
    kinds: Sequence[str] | None = None,
    density: float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One synthetic mammogram: (uint16 image, uint8 class mask, lesion records).

    ``label`` 0 gives a normal view; 1/2 add the lesions ``kinds`` (default: one,
    sometimes two, random kinds of that class). ``density`` (-1 fatty .. +1 dense)
    lets the views of one case share a breast density. Lesion records hold kind,
    class, class_name, bbox ``[y0, x0, y1, x1)``, centre ``[y, x]`` and area.
    """
    if side not in SIDES or view not in VIEWS or label not in (0, 1, 2):
        raise ValueError(f"bad view spec: label={label} side={side} view={view}")
    if label and kinds is None:
        kinds = _pick_kinds(rng, label)
    if not set(kinds or []) <= set(LESION_KINDS.get(label, ())):
        raise ValueError(f"kinds {kinds} do not belong to class {label}")
    scale = min(height, width) / _REFERENCE_SIDE
    anatomy = _anatomy(rng, view, height, width)
    tissue = _tissue(rng, anatomy, rng.uniform(-0.6, 0.6) if density is None else density)
    lesions, mask, records = _add_lesions(rng, anatomy, label, kinds or [], scale)
    image = _to_uint16(_compose(rng, anatomy, tissue, lesions, scale))
    if side == "RIGHT":
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
        records = [_flip_record(r, width) for r in records]
    return image, mask, records


def _pick_kinds(rng: np.random.Generator, label: int) -> list[str]:
    """One lesion kind of the class, and a second one in a fifth of the cases."""
    n = 2 if rng.random() < 0.2 else 1
    return [str(k) for k in rng.choice(LESION_KINDS[label], size=n)]


# --------------------------------------------------------------------------- data set

_CSV_COLUMNS = (
    "image_id",
    "case_id",
    "side",
    "view",
    "split",
    "label",
    "case_label",
    "path",
    "mask_path",
    "dicom_path",
)


def _generate_case(
    seed: int, index: int, height: int, width: int
) -> tuple[int, list[tuple[str, str, np.ndarray, np.ndarray, list[dict]]]]:
    """All four views of case ``index``: (case label, [(side, view, image, mask, lesions)]).

    Classes go round-robin so they stay balanced; the lesion side shows the same
    lesion kinds in CC and MLO, the other side is normal.
    """
    label = index % len(CLASS_NAMES)
    rng = _rng(seed, _CASE, index)
    lesion_side = SIDES[int(rng.integers(len(SIDES)))]
    density = float(rng.uniform(-0.6, 0.6))
    kinds = _pick_kinds(rng, label) if label else []
    views = []
    for k, (side, view) in enumerate((s, v) for s in SIDES for v in VIEWS):
        view_label = label if side == lesion_side else 0
        image, mask, lesions = generate_view(
            _rng(seed, _VIEW, 4 * index + k),
            view_label,
            side,
            view,
            height,
            width,
            kinds=kinds if view_label else None,
            density=density,
        )
        views.append((side, view, image, mask, lesions))
    return label, views


def _assign_splits(n_cases: int, seed: int, split: tuple[float, float, float]) -> list[str]:
    """Split by case, stratified by class, shuffled deterministically.

    Rounding leftovers go to val, which matters least: training reports test metrics.
    """
    rng = _rng(seed, _SPLIT, 0)
    splits = [""] * n_cases
    for label in range(len(CLASS_NAMES)):
        cases = rng.permutation(np.arange(label, n_cases, len(CLASS_NAMES)))
        n_train = int(len(cases) * split[0] + 0.5)
        n_test = min(int(len(cases) * split[2] + 0.5), len(cases) - n_train)
        n_val = len(cases) - n_train - n_test
        for rank, case in enumerate(cases):
            splits[case] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return splits


def write_dicom(
    path: Path, image: np.ndarray, image_id: str, case_index: int, side: str, view: str, seed: int
) -> None:
    """Mammography DICOM with made-up patient identifiers.

    The identifiers are fake but realistic in form so that later tests can prove
    that they never leak into outputs. UIDs are hashed from (seed, ids), keeping
    files byte-identical across runs.
    """
    n = case_index + 1

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[GENERATOR_NAME, str(seed), *parts])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid(image_id, "sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(f"case{case_index}", "study")
    ds.SeriesInstanceUID = uid(image_id, "series")
    ds.PatientName = f"SYNTHETIC^PATIENT{n}"
    ds.PatientID = f"SYN-PID-{n:06d}"
    ds.PatientBirthDate = f"{1940 + 7 * n % 40}{n % 12 + 1:02d}{n % 28 + 1:02d}"
    ds.PatientSex = "F"
    ds.StudyDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.ContentTime = "090000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{n}"
    ds.AccessionNumber = f"SYN-ACC-{n:06d}"
    ds.Modality = "MG"
    ds.Manufacturer = GENERATOR_NAME
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = side[0]
    ds.ViewPosition = view
    forward = "A" if side == "LEFT" else "P"
    ds.PatientOrientation = [forward, ("" if view == "CC" else "F") + ("R" if side == "LEFT" else "L")]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1 + 2 * SIDES.index(side) + VIEWS.index(view)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    # Detector pixel size (Type 1 in the DX Detector module; derived DICOM objects need a pixel spacing):
    # a nominal 21 cm detector height over the image's rows, so it stays fixed for a given image size.
    ds.ImagerPixelSpacing = [f"{DETECTOR_HEIGHT_MM / image.shape[0]:.6f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = image.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def generate_dataset(
    out_dir: Path,
    n_cases: int,
    seed: int,
    height: int = 1400,
    width: int = 908,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    n_dicom: int = 4,
    progress: bool = True,
) -> Path:
    """Write a synthetic DDSM-like data set to ``out_dir`` and return ``out_dir``.

    Layout: ``images/{image_id}.png`` (16-bit), ``masks/{image_id}.png`` (class
    index), ``dicom/{image_id}.dcm`` for the first ``n_dicom`` images,
    ``images.csv``, ``lesions.json`` and ``dataset.json``. Every case has its own
    RNG derived from (seed, case index), so output is byte-identical for a seed
    and a case does not depend on how many cases are generated.
    """
    out_dir = Path(out_dir)
    for sub in ("images", "masks", "dicom"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(n_cases, seed, split)
    rows: list[dict] = []
    lesions_by_image: dict[str, list[dict]] = {}
    for index in tqdm(range(n_cases), desc="synthetic mammograms", unit="case", disable=not progress):
        case_id = f"C{index + 1:04d}"
        case_label, views = _generate_case(seed, index, height, width)
        for side, view, image, mask, lesions in views:
            image_id = f"{case_id}_{side}_{view}"
            # Noisy 16-bit data barely compresses further at higher levels, only slower.
            Image.fromarray(image).save(out_dir / "images" / f"{image_id}.png", compress_level=1)
            Image.fromarray(mask).save(out_dir / "masks" / f"{image_id}.png")
            dicom_path = ""
            if len(rows) < n_dicom:
                dicom_path = f"dicom/{image_id}.dcm"
                write_dicom(out_dir / dicom_path, image, image_id, index, side, view, seed)
            lesions_by_image[image_id] = lesions
            rows.append(
                {
                    "image_id": image_id,
                    "case_id": case_id,
                    "side": side,
                    "view": view,
                    "split": splits[index],
                    "label": int(mask.max()),
                    "case_label": case_label,
                    "path": f"images/{image_id}.png",
                    "mask_path": f"masks/{image_id}.png",
                    "dicom_path": dicom_path,
                }
            )
    with open(out_dir / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "lesions.json").write_text(json.dumps(lesions_by_image, indent=1) + "\n")
    (out_dir / "dataset.json").write_text(
        json.dumps(_summary(rows, n_cases, seed, height, width, split), indent=2) + "\n"
    )
    return out_dir


def _summary(
    rows: list[dict], n_cases: int, seed: int, height: int, width: int, split: tuple[float, float, float]
) -> dict:
    """dataset.json content: provenance plus case and image counts per split and class."""
    cases = {(r["case_id"], r["split"], r["case_label"]) for r in rows}
    case_counts = Counter((s, CLASS_NAMES[c]) for _, s, c in cases)
    image_counts = Counter((r["split"], CLASS_NAMES[r["label"]]) for r in rows)
    splits = ("train", "val", "test")
    return {
        "generator": GENERATOR_NAME,
        "version": VERSION,
        "seed": seed,
        "n_cases": n_cases,
        "height": height,
        "width": width,
        "split_fractions": list(split),
        "class_names": list(CLASS_NAMES),
        "counts": {
            "cases": {s: {c: case_counts[(s, c)] for c in CLASS_NAMES} for s in splits},
            "images": {s: {c: image_counts[(s, c)] for c in CLASS_NAMES} for s in splits},
        },
    }


def read_images_csv(dataset_dir: Path) -> list[dict]:
    """Rows of ``images.csv`` with integer labels."""
    with open(Path(dataset_dir) / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = int(row["label"])
        row["case_label"] = int(row["case_label"])
    return rows


def build_patch_set(
    dataset_dir: Path, split: str, normal_per_image: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """DeepMiner training patches of one split: (patches, labels, image_ids, boxes).

    Tiles every image of the split, keeps all lesion tiles (labelled with
    ``tiling.tile_label``) and ``normal_per_image`` normal tiles chosen at random
    per image (deterministic from seed and image id), so lesions are not swamped
    by the ~100 normal tiles per mammogram. Patches are uint8 (N, 227, 227) to
    keep training memory small; boxes are (y, x, size) in image pixels. The
    result is cached in ``dataset_dir/patches_{split}_{normal_per_image}.npz``
    and reused when it was built with the same seed from the same data set
    (fingerprint of images.csv and dataset.json).
    """
    dataset_dir = Path(dataset_dir)
    cache = dataset_dir / f"patches_{split}_{normal_per_image}.npz"
    listing = (dataset_dir / "images.csv").read_bytes() + (dataset_dir / "dataset.json").read_bytes()
    key = np.array([seed, zlib.crc32(listing)])
    if cache.exists():
        with np.load(cache) as z:
            if np.array_equal(z["key"], key):
                return z["patches"], z["labels"], [str(i) for i in z["image_ids"]], z["boxes"]
    patches: list[np.ndarray] = []
    labels: list[int] = []
    image_ids: list[str] = []
    boxes: list[tuple[int, int, int]] = []
    for row in (r for r in read_images_csv(dataset_dir) if r["split"] == split):
        image = np.asarray(Image.open(dataset_dir / row["path"]))
        mask = np.asarray(Image.open(dataset_dir / row["mask_path"]))
        tiles = tile_grid(*image.shape)
        components = label_components(mask)
        tile_labels = np.array([tile_label(mask, t, components=components) for t in tiles])
        normal = np.flatnonzero(tile_labels == 0)
        rng = _rng(seed, _PATCH, zlib.crc32(row["image_id"].encode()))
        keep = np.concatenate(
            [np.flatnonzero(tile_labels > 0), rng.choice(normal, min(normal_per_image, normal.size), replace=False)]
        )
        for i in np.sort(keep):
            tile = tiles[i]
            patches.append(np.round(extract_patch(image, tile) * 255).astype(np.uint8))
            labels.append(int(tile_labels[i]))
            image_ids.append(row["image_id"])
            boxes.append((tile.y, tile.x, tile.size))
    result = (
        np.asarray(patches, dtype=np.uint8).reshape(-1, PATCH_SIZE, PATCH_SIZE),
        np.asarray(labels, dtype=np.int64),
        image_ids,
        np.asarray(boxes, dtype=np.int64).reshape(-1, 3),
    )
    np.savez(
        cache,
        patches=result[0],
        labels=result[1],
        image_ids=np.asarray(image_ids, dtype=str),
        boxes=result[3],
        key=key,
    )
    return result
