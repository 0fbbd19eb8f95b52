"""Labelled brain parcellation on the MNI-152 template grid.

AAL / Harvard-Oxford cannot be downloaded at run time, so `build_atlas` derives a
deterministic parcellation from ellipsoids placed at approximate MNI coordinates of
the structures relevant to Alzheimer's disease (medial temporal lobe, temporal gyri,
ventricles) plus the rest of the brain. Names follow AAL conventions
("Temporal_Inf_L") so per-region relevance tables read like the seed study's.
A real atlas can be used instead through `load_atlas`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.image import resample_img

HEMISPHERES = ("L", "R", "M")
MNI_XFORM_CODE = 4  # NIfTI code for "MNI 152" space.


@dataclass(frozen=True)
class Region:
    """One atlas label: `index` is the voxel value, `hemisphere` is L, R or M (midline)."""

    index: int
    name: str
    hemisphere: str


@dataclass(frozen=True)
class _Ellipsoid:
    """Approximate extent of a structure in MNI mm (right-hemisphere x for bilateral ones).

    `pitch_deg` rotates the long axis in the sagittal plane (positive: anterior end up),
    which the hippocampus and brainstem need to follow their oblique course.
    `compact` structures keep their ellipsoid shape instead of absorbing nearby
    unassigned white matter, so e.g. the hippocampus label stays hippocampus-sized.
    """

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    bilateral: bool = True
    pitch_deg: float = 0.0
    compact: bool = False


# Priority order: a voxel inside several ellipsoids takes the first one, so small deep
# structures come before the large cortical regions that would otherwise swallow them.
_SHAPES: tuple[_Ellipsoid, ...] = (
    _Ellipsoid("Thalamus", (11, -18, 7), (7, 10, 7), compact=True),
    _Ellipsoid("Caudate", (13, 10, 10), (5, 10, 9), compact=True),
    _Ellipsoid("Putamen", (25, 3, 1), (5, 11, 8), compact=True),
    _Ellipsoid("Hippocampus", (28, -22, -12), (6, 20, 7), pitch_deg=-30, compact=True),
    _Ellipsoid("Amygdala", (23, -4, -19), (8, 7, 7), compact=True),
    _Ellipsoid("ParaHippocampal", (24, -26, -22), (6, 19, 6), pitch_deg=-25, compact=True),
    _Ellipsoid("Lateral_Ventricle", (14, -10, 16), (10, 32, 11), compact=True),
    _Ellipsoid("Brainstem", (0, -30, -30), (9, 11, 26), bilateral=False, pitch_deg=-23),
    _Ellipsoid("Vermis", (0, -62, -28), (5, 16, 14), bilateral=False),
    _Ellipsoid("Cerebellum", (27, -62, -38), (22, 18, 14)),
    _Ellipsoid("Insula", (38, 0, 3), (5, 18, 12)),
    _Ellipsoid("Temporal_Pole", (40, 14, -30), (12, 10, 10)),
    _Ellipsoid("Temporal_Inf", (50, -30, -26), (9, 28, 8)),
    _Ellipsoid("Temporal_Mid", (59, -30, -8), (8, 30, 8)),
    _Ellipsoid("Temporal_Sup", (56, -18, 6), (9, 25, 7)),
    _Ellipsoid("Fusiform", (35, -45, -20), (8, 20, 6)),
    _Ellipsoid("Frontal_Orb", (24, 40, -14), (15, 20, 7)),
    _Ellipsoid("Frontal_Inf", (48, 24, 10), (9, 16, 12)),
    _Ellipsoid("Frontal_Mid", (37, 30, 36), (10, 28, 14)),
    _Ellipsoid("Frontal_Sup", (18, 32, 48), (9, 32, 16)),
    _Ellipsoid("Precentral", (40, -14, 50), (14, 8, 20)),
    _Ellipsoid("Postcentral", (40, -30, 50), (14, 8, 18)),
    _Ellipsoid("Cingulum_Ant", (6, 30, 14), (5, 16, 12)),
    _Ellipsoid("Cingulum_Post", (6, -30, 34), (5, 20, 8)),
    _Ellipsoid("Precuneus", (8, -60, 42), (7, 15, 16)),
    _Ellipsoid("Parietal_Sup", (26, -60, 58), (12, 14, 12)),
    _Ellipsoid("Parietal_Inf", (48, -46, 40), (10, 18, 12)),
    _Ellipsoid("Cuneus", (8, -82, 24), (6, 10, 12)),
    _Ellipsoid("Lingual", (14, -74, -4), (8, 14, 8)),
    _Ellipsoid("Occipital_Lat", (32, -84, 6), (14, 12, 16)),
)


def voxel_world_coords(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (3, n) voxel indices to (n, 3) world mm coordinates."""
    return (affine[:3, :3] @ index + affine[:3, 3:4]).T


def _ellipsoid_distances(points: np.ndarray, shape: _Ellipsoid) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (<= 1 inside) and approximate mm distance outside the surface.

    The mm distance is measured along the ray from the centre, |p - c| (1 - 1/d), so
    leftover voxels go to the nearest surface regardless of ellipsoid size.
    """
    rel = points.copy()
    if shape.bilateral:
        rel[:, 0] = np.abs(rel[:, 0])
    rel -= np.asarray(shape.centre, dtype=rel.dtype)
    theta = np.deg2rad(shape.pitch_deg)
    local_y = np.cos(theta) * rel[:, 1] + np.sin(theta) * rel[:, 2]
    local_z = -np.sin(theta) * rel[:, 1] + np.cos(theta) * rel[:, 2]
    rx, ry, rz = shape.radii
    radius = np.sqrt((rel[:, 0] / rx) ** 2 + (local_y / ry) ** 2 + (local_z / rz) ** 2)
    centre_mm = np.sqrt(rel[:, 0] ** 2 + local_y**2 + local_z**2)
    return radius, centre_mm * (1 - 1 / np.maximum(radius, 1.0))


def _regions_for(shapes: tuple[_Ellipsoid, ...]) -> tuple[list[Region], list[tuple[int, int]]]:
    """Region list (1-based, L before R) and per-shape (left/midline, right) indices."""
    regions: list[Region] = []
    shape_indices: list[tuple[int, int]] = []
    for shape in shapes:
        if shape.bilateral:
            left = Region(len(regions) + 1, f"{shape.name}_L", "L")
            right = Region(len(regions) + 2, f"{shape.name}_R", "R")
            regions += [left, right]
            shape_indices.append((left.index, right.index))
        else:
            mid = Region(len(regions) + 1, shape.name, "M")
            regions.append(mid)
            shape_indices.append((mid.index, mid.index))
    return regions, shape_indices


def build_atlas(brain_mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[Region]]:
    """Parcellate every brain voxel into exactly one of ~58 named regions.

    A voxel takes the first ellipsoid (in priority order) containing it; voxels inside
    none take the nearest (in mm) non-compact ellipsoid. Bilateral regions
    are split by the sign of MNI x (x < 0 is left). Works on any grid via `affine`.
    """
    regions, shape_indices = _regions_for(_SHAPES)
    index = np.nonzero(brain_mask)
    points = voxel_world_coords(np.asarray(index, dtype=np.float64), affine).astype(np.float32)
    first_inside = np.full(len(points), -1, dtype=np.int32)
    nearest = np.zeros(len(points), dtype=np.int32)
    best = np.full(len(points), np.inf)
    for k, shape in enumerate(_SHAPES):
        radius, gap_mm = _ellipsoid_distances(points, shape)
        first_inside[(first_inside < 0) & (radius <= 1.0)] = k
        if not shape.compact:
            closer = gap_mm < best
            nearest[closer], best[closer] = k, gap_mm[closer]
    chosen = np.where(first_inside >= 0, first_inside, nearest)
    left_right = np.asarray(shape_indices, dtype=np.int16)
    is_right = (points[:, 0] >= 0).astype(np.intp)
    labels = np.zeros(brain_mask.shape, dtype=np.int16)
    labels[index] = left_right[chosen, is_right]
    return labels, regions


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write `data` as NIfTI tagged as MNI space in mm, keeping its dtype."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=MNI_XFORM_CODE)
    img.set_qform(affine, code=MNI_XFORM_CODE)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_atlas(path_nii: Path, path_csv: Path, labels: np.ndarray, regions: list[Region], affine: np.ndarray) -> None:
    """Persist an atlas as int16 NIfTI plus `index,name,hemisphere` CSV (readable by load_atlas)."""
    save_nifti(Path(path_nii), labels.astype(np.int16), affine)
    with open(path_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "name", "hemisphere"])
        writer.writerows([r.index, r.name, r.hemisphere] for r in regions)


def _infer_hemisphere(name: str) -> str:
    """Guess L/R/M from common suffix/prefix conventions (AAL `_L`, `Left ...`)."""
    lowered = name.strip().lower()
    if lowered.endswith(("_l", " l", ".l")) or lowered.startswith("left"):
        return "L"
    if lowered.endswith(("_r", " r", ".r")) or lowered.startswith("right"):
        return "R"
    return "M"


def _read_label_table(labels_csv: Path) -> list[Region]:
    """Parse `index,name[,hemisphere]` rows; header optional, comma- or whitespace-separated.

    AAL's own text files (`1 Precentral_L 2001`) also parse: a third column that is not
    L/R/M is ignored and the hemisphere is inferred from the name.
    """
    regions: list[Region] = []
    for line in Path(labels_csv).read_text().splitlines():
        fields = [f.strip() for f in (line.split(",") if "," in line else line.split())]
        if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
            continue  # blank line, comment or header
        hemisphere = fields[2].upper() if len(fields) > 2 else ""
        if hemisphere not in HEMISPHERES:
            hemisphere = _infer_hemisphere(fields[1])
        regions.append(Region(int(fields[0]), fields[1], hemisphere))
    if not regions:
        raise ValueError(f"no 'index,name' rows found in {labels_csv}")
    return regions


def load_atlas(
    nifti_path: Path,
    labels_csv: Path,
    target_shape: tuple[int, int, int] | None = None,
    target_affine: np.ndarray | None = None,
) -> tuple[np.ndarray, list[Region]]:
    """Load a user atlas (e.g. AAL) and put it on the target grid with nearest neighbour.

    Nearest-neighbour keeps labels integral; resampling is skipped when the grid
    already matches. Both `target_shape` and `target_affine` are needed to resample.
    """
    img = nib.load(str(nifti_path))
    if len(img.shape) != 3:
        raise ValueError(f"atlas must be a 3D label image, got shape {img.shape}")
    if (target_shape is None) != (target_affine is None):
        raise ValueError("give both target_shape and target_affine, or neither")
    same_grid = target_shape is None or (
        tuple(img.shape) == tuple(target_shape) and np.allclose(img.affine, target_affine, atol=1e-4)
    )
    if not same_grid:
        img = resample_img(
            img,
            target_affine=np.asarray(target_affine),
            target_shape=tuple(target_shape),
            interpolation="nearest",
            force_resample=True,
            copy_header=True,
        )
    labels = np.rint(np.asarray(img.dataobj)).astype(np.int16)
    return labels, _read_label_table(Path(labels_csv))
