"""Deterministic synthetic 3D T1 brain MRI (CN vs AD) with ground-truth atrophy masks.

Stands in for ADNI, which cannot be downloaded: each subject is the MNI-152 template
(shipped inside nilearn, so no network) with natural variation (mild global grey-matter
loss, ventricle size), the small misalignment a registration to the template leaves, bias
field, gain and Rician noise.
AD subjects additionally receive grey-matter loss in the medial temporal lobe and the
inferior/middle temporal gyri plus enlarged lateral ventricles. Where that planted loss
is at least MASK_THRESHOLD the voxel is marked in the atrophy mask, so attribution maps
can be scored against ground truth and per-region relevance matches atlas names.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nilearn import datasets
from scipy import ndimage
from tqdm import tqdm

from medxplain_models.adni import covering_size
from medxplain_models.atlas import Region, build_atlas, save_nifti, write_atlas
from model_store.synth.mri_dicom import write_series

SEED_SHAPE = (193, 229, 193)
CLASS_NAMES = ("CN", "AD")
SPLIT_NAMES = ("train", "val", "test")
GENERATOR = "model_store.synth.mri"
VERSION = "2.0.0"  # 2: covered grid (dataset_grid), registration-residual warp
# Minimum planted loss (fraction of the way from tissue to CSF intensity) marked as atrophy.
MASK_THRESHOLD = 0.1
# Relative AD vulnerability of atlas regions (base names), roughly following Braak staging.
AD_REGION_WEIGHTS = {
    "Hippocampus": 1.0,
    "Amygdala": 0.9,
    "ParaHippocampal": 0.85,
    "Temporal_Inf": 0.7,
    "Temporal_Mid": 0.6,
}
# Medial temporal structures shrink as a whole (grey and white matter); the lateral
# temporal gyri only thin their grey matter.
WHOLE_STRUCTURE_REGIONS = ("Hippocampus", "Amygdala", "ParaHippocampal")
WHITE_MATTER_SHRINKAGE = 0.5
VENTRICLE_REGION = "Lateral_Ventricle"

Atlas = tuple[np.ndarray, Sequence[Region]]


@dataclass(frozen=True)
class _TissueLevels:
    """Template intensities of the tissue classes (k-means means) and of pure CSF.

    Lost tissue is replaced by `pure_csf`, darker than the CSF class mean, which is
    pulled up by partial-volume voxels of the averaged template.
    """

    csf: float
    gm: float
    wm: float
    pure_csf: float


@dataclass(frozen=True)
class _AtrophyParams:
    """AD-specific random draws; drawn for every subject so RNG streams stay aligned."""

    region_severity: dict[int, float]
    ventricle_growth_mm: float


# ----------------------------------------------------------------------------- grid


def _crop_or_pad(data: np.ndarray, affine: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`shape` voxels from index `start` (negative or past the end: zero padding); affine follows."""
    out = np.zeros(shape, dtype=data.dtype)
    src, dst = [], []
    for lo, n_in, n_out in zip(start, data.shape, shape):
        lo_src, lo_dst = max(lo, 0), max(-lo, 0)
        length = min(n_in - lo_src, n_out - lo_dst)
        src.append(slice(lo_src, lo_src + length))
        dst.append(slice(lo_dst, lo_dst + length))
    out[tuple(dst)] = data[tuple(src)]
    translate = np.eye(4)
    translate[:3, 3] = start
    return out, affine @ translate


def _fit_to_shape(data: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop/zero-pad `data` to `shape`, shifting the affine so world coordinates stay put."""
    return _crop_or_pad(data, affine, [(n_in - n_out) // 2 for n_in, n_out in zip(data.shape, shape)], shape)


def _block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks (zero-padding the high end) -> ceil(n/factor)."""
    padded_shape = [-(-n // factor) * factor for n in data.shape]
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in data.shape)] = data
    nx, ny, nz = (n // factor for n in padded_shape)
    return padded.reshape(nx, factor, ny, factor, nz, factor).mean(axis=(1, 3, 5))


def _block_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the block-averaged grid: voxel i is centred on fine voxel factor*i + (factor-1)/2."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return affine @ scale


@functools.lru_cache(maxsize=3)
def template_grid(resolution_mm: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI-152 T1 template, brain mask and affine on the seed's 193x229x193 grid (or coarser).

    nilearn ships the template as 197x233x189; it is centre-cropped/padded to SEED_SHAPE.
    Resolution 2 or 3 block-averages to ceil(193/r) x ceil(229/r) x ceil(193/r).
    Intensities lie in [0, 1] with zero outside the brain. Arrays are cached and read-only.
    """
    if resolution_mm not in (1, 2, 3):
        raise ValueError(f"resolution_mm must be 1, 2 or 3, got {resolution_mm}")
    t1 = datasets.load_mni152_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    template, affine = _fit_to_shape(np.asarray(t1.dataobj, dtype=np.float32), t1.affine, SEED_SHAPE)
    mask, _ = _fit_to_shape(np.asarray(mask_img.dataobj, dtype=np.float32), mask_img.affine, SEED_SHAPE)
    if resolution_mm > 1:
        template, mask = _block_mean(template, resolution_mm), _block_mean(mask, resolution_mm)
        affine = _block_affine(affine, resolution_mm)
    brain = mask >= 0.5
    template = np.where(brain, template / template[brain].max(), 0).astype(np.float32)
    for array in (template, brain, affine):
        array.setflags(write=False)
    return template, brain, affine


@functools.lru_cache(maxsize=3)
def dataset_grid(resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template grid the data sets are written on: every brain voxel inside the network's view.

    ClassificationModel3D's unpadded convs and max-pools drop trailing voxels; on the 97x115x97
    2 mm grid it never saw the last 38 mm in x (the right lateral temporal lobe) nor the top slice.
    Each axis whose brain reaches past the covered part is cut (or padded) to the smallest covered
    size around the brain's bounding box: 78x115x78 at 2 mm (y keeps its 115 voxels: the brain ends
    inside the covered 114). The 1 mm seed grid already covers the brain and keeps its shape, so the
    seed's checkpoints still fit.
    """
    template, brain, affine = template_grid(resolution_mm)
    start, shape = [], []
    for axis, n in enumerate(brain.shape):
        occupied = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lo, extent = int(occupied[0]), int(occupied[-1] - occupied[0] + 1)
        covered = max((size for size in map(covering_size, range(1, n + 1)) if size <= n), default=0)
        if occupied[-1] < covered:
            start.append(0)
            shape.append(n)
        else:
            size = covering_size(extent)
            start.append(lo - (size - extent) // 2)
            shape.append(size)
    template, grid_affine = _crop_or_pad(template, affine, start, shape)
    brain, _ = _crop_or_pad(brain, affine, start, shape)
    for array in (template, brain, grid_affine):
        array.setflags(write=False)
    return template, brain, grid_affine


# ----------------------------------------------------------------------------- tissue


def _tissue_levels(template: np.ndarray, brain_mask: np.ndarray) -> _TissueLevels:
    """Three-class 1-D k-means on the brain intensity histogram (CSF < GM < WM) + 1st percentile."""
    counts, edges = np.histogram(template[brain_mask], bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    cdf = np.cumsum(counts) / counts.sum()
    means = centres[np.searchsorted(cdf, [0.05, 0.5, 0.95])]
    for _ in range(30):
        nearest = np.argmin(np.abs(centres[:, None] - means[None, :]), axis=1)
        means = np.array([np.average(centres[nearest == k], weights=counts[nearest == k] + 1e-9) for k in range(3)])
    pure_csf = centres[np.searchsorted(cdf, 0.01)]
    return _TissueLevels(*(float(m) for m in means), pure_csf=float(pure_csf))


def _tissue_weights(template: np.ndarray, levels: _TissueLevels) -> tuple[np.ndarray, np.ndarray]:
    """Soft grey-matter and white-matter memberships (triangular in intensity)."""
    gm = np.where(
        template < levels.gm,
        (template - levels.csf) / (levels.gm - levels.csf),
        (levels.wm - template) / (levels.wm - levels.gm),
    )
    wm = (template - levels.gm) / (levels.wm - levels.gm)
    return np.clip(gm, 0, 1).astype(np.float32), np.clip(wm, 0, 1).astype(np.float32)


def _padded_bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Bounding box of `mask` grown by `pad` voxels, to run filters on a small crop."""
    nonzero = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n)) for i, n in zip(nonzero, mask.shape))


def _region_ids(regions: Sequence[Region], base_name: str) -> dict[int, str]:
    """Atlas indices of a bilateral base name, e.g. Hippocampus -> {idx_L: 'L', idx_R: 'R'}."""
    return {r.index: r.hemisphere for r in regions if r.name == f"{base_name}_{r.hemisphere}"}


def _check_atlas(regions: Sequence[Region]) -> None:
    """Atrophy is planted by region name, so the atlas must be build_atlas' (or name-compatible)."""
    missing = [b for b in (*AD_REGION_WEIGHTS, VENTRICLE_REGION) if len(_region_ids(regions, b)) != 2]
    if missing:
        raise ValueError(f"atlas lacks left/right regions {missing}; use atlas.build_atlas")


# ----------------------------------------------------------------------------- atrophy


def _draw_atrophy(rng: np.random.Generator, regions: Sequence[Region]) -> _AtrophyParams:
    """Random AD severity, slight left/right asymmetry and per-region jitter."""
    severity = rng.uniform(0.6, 0.95)
    asymmetry = rng.uniform(-0.15, 0.15)
    region_severity = {}
    for base, weight in AD_REGION_WEIGHTS.items():
        for index, hemisphere in sorted(_region_ids(regions, base).items()):
            side = 1 + asymmetry if hemisphere == "L" else 1 - asymmetry
            region_severity[index] = float(min(severity * weight * side * rng.uniform(0.85, 1.15), 0.95))
    return _AtrophyParams(region_severity, ventricle_growth_mm=float(severity * rng.uniform(2.5, 5.0)))


def _temporal_loss(
    labels: np.ndarray,
    regions: Sequence[Region],
    region_severity: dict[int, float],
    tissue: tuple[np.ndarray, np.ndarray],
    voxel_mm: float,
) -> np.ndarray:
    """Smoothed regional severity applied to grey matter, and to white matter in the MTL."""
    lut = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    for index, value in region_severity.items():
        lut[index] = value
    sigma = 2.0 / voxel_mm
    box = _padded_bbox(lut[labels] > 0, int(np.ceil(3 * sigma)))
    severity = lut[labels[box]]
    whole_ids = [i for base in WHOLE_STRUCTURE_REGIONS for i in _region_ids(regions, base)]
    whole = np.where(np.isin(labels[box], whole_ids), severity, 0)
    gm_weight, wm_weight = (weight[box] for weight in tissue)
    loss = np.zeros(labels.shape, dtype=np.float32)
    loss[box] = ndimage.gaussian_filter(severity, sigma) * gm_weight + (
        WHITE_MATTER_SHRINKAGE * ndimage.gaussian_filter(whole, sigma) * wm_weight
    )
    return loss


def _ventricle_distance(
    template: np.ndarray,
    labels: np.ndarray,
    regions: Sequence[Region],
    levels: _TissueLevels,
    voxel_mm: float,
    reach_mm: float,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Distance (mm) to lateral-ventricle CSF on a crop that reaches `reach_mm` around it."""
    in_region = np.isin(labels, list(_region_ids(regions, VENTRICLE_REGION)))
    csf = in_region & (template < (levels.csf + levels.gm) / 2)
    box = _padded_bbox(csf, int(np.ceil(reach_mm / voxel_mm)) + 2)
    return box, ndimage.distance_transform_edt(~csf[box], sampling=voxel_mm).astype(np.float32)


def _ventricle_loss(
    box: tuple[slice, ...], distance: np.ndarray, shape: tuple[int, ...], growth_mm: float, voxel_mm: float
) -> np.ndarray:
    """Tissue within `growth_mm` of ventricular CSF turns into CSF (soft one-voxel edge)."""
    loss = np.zeros(shape, dtype=np.float32)
    loss[box] = np.clip(1 + (growth_mm - distance) / voxel_mm, 0, 1) * (distance > 0)
    return loss


def _combine(*losses: np.ndarray) -> np.ndarray:
    """Independent losses compose multiplicatively on the remaining tissue."""
    keep = np.ones_like(losses[0])
    for loss in losses:
        keep *= 1 - loss
    return 1 - keep


# ----------------------------------------------------------------------------- acquisition


@functools.lru_cache(maxsize=32)
def _spline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) cubic-spline weights spreading control values evenly over n_out voxels.

    Spline interpolation is linear in the control values, so interpolating unit vectors
    gives the weights; a separable product of three such matrices then evaluates a
    smooth 3-D field on the whole grid far faster than map_coordinates at every voxel.
    """
    positions = np.linspace(0, n_ctrl - 1, n_out)
    columns = [ndimage.map_coordinates(unit, [positions], order=3, mode="nearest") for unit in np.eye(n_ctrl)]
    return np.stack(columns, axis=1).astype(np.float32)


def _smooth_random_field(rng: np.random.Generator, control_shape: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Unit-variance random values on a coarse control grid, cubic-interpolated onto `shape`."""
    control = rng.standard_normal(control_shape).astype(np.float32)
    wx, wy, wz = (_spline_matrix(n, c) for n, c in zip(shape, control_shape))
    return np.einsum("ia,jb,kc,abc->ijk", wx, wy, wz, control, optimize=True)


def _sample_points(
    rng: np.random.Generator, index: tuple[np.ndarray, ...], shape: Sequence[int], voxel_mm: float
) -> np.ndarray:
    """Where each brain voxel samples the template: what registration to it leaves uncorrected.

    The seed's scans were non-linearly registered to the template (ANTs) before training, so a
    subject differs from the template by a registration residual, not by its raw anatomy: a
    near-identity affine (0.5 degree, 0.5 % scale) and a smooth warp of 0.5-1 mm standard deviation
    with control points every ~32 mm. (A raw-anatomy warp of 1-2.5 mm plus 2 degrees moved the
    planted atrophy off its template position: Dice of the mask with the unwarped one 0.74-0.84
    at 2 mm, now 0.88-0.94, on six AD subjects.)
    """
    control_shape = tuple(int(np.ceil(n * voxel_mm / 32)) + 1 for n in shape)
    amplitude = rng.uniform(0.5, 1.0) / voxel_mm
    angles = np.deg2rad(rng.normal(0, 0.5, 3))
    scales = 1 + rng.normal(0, 0.005, 3)
    linear = (_rotation(angles) * scales[None, :]).astype(np.float32)
    points = np.asarray(index, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32)[:, None] - 1) / 2
    moved = linear @ (points - centre) + centre
    for axis in range(3):
        moved[axis] += amplitude * _smooth_random_field(rng, control_shape, shape)[index]
    return moved


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three Euler angles (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _bias_field(rng: np.random.Generator, index: tuple[np.ndarray, ...], shape: Sequence[int]) -> np.ndarray:
    """Smooth multiplicative coil inhomogeneity, roughly +-5-20% across the brain."""
    strength = rng.uniform(0.04, 0.1)
    return np.exp(strength * _smooth_random_field(rng, (4, 4, 4), shape)[index])


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise, as in MRI reconstructions."""
    real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2)


# ----------------------------------------------------------------------------- subject


def generate_subject(
    rng: np.random.Generator,
    label: int,
    template: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    atlas: Atlas,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic T1 volume (float32, brain-masked) and its atrophy mask (uint8).

    label 0 = CN (empty mask), 1 = AD. Every random draw happens for both labels in the
    same order, so a CN and an AD subject generated from identical RNG states share
    anatomy, warp and noise and differ only by the planted atrophy.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (CN) or 1 (AD), got {label}")
    labels, regions = atlas
    _check_atlas(regions)
    voxel_mm = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    levels = _tissue_levels(template, brain_mask)
    gm_weight, wm_weight = _tissue_weights(template, levels)

    global_loss = rng.uniform(0.0, 0.15) * gm_weight
    natural_growth_mm = rng.uniform(0.0, 1.5)
    atrophy = _draw_atrophy(rng, regions)
    ad_growth_mm = natural_growth_mm + atrophy.ventricle_growth_mm
    box, distance = _ventricle_distance(template, labels, regions, levels, voxel_mm, ad_growth_mm + voxel_mm)

    natural = _combine(global_loss, _ventricle_loss(box, distance, template.shape, natural_growth_mm, voxel_mm))
    if label == 1:
        total = _combine(
            global_loss,
            _ventricle_loss(box, distance, template.shape, ad_growth_mm, voxel_mm),
            _temporal_loss(labels, regions, atrophy.region_severity, (gm_weight, wm_weight), voxel_mm),
        )
    else:
        total = natural
    tissue = template - np.maximum(template - levels.pure_csf, 0) * total

    index = np.nonzero(brain_mask)
    sample_at = _sample_points(rng, index, template.shape, voxel_mm)
    signal = ndimage.map_coordinates(tissue, sample_at, order=1, mode="constant", cval=0.0)
    signal *= _bias_field(rng, index, template.shape) * rng.uniform(0.9, 1.1)
    signal = _rician(rng, signal, sigma=rng.uniform(0.01, 0.03) * levels.wm)

    volume = np.zeros(template.shape, dtype=np.float32)
    volume[index] = signal
    mask = np.zeros(template.shape, dtype=np.uint8)
    if label == 1:
        planted = ndimage.map_coordinates(total - natural, sample_at, order=1, mode="constant", cval=0.0)
        mask[index] = planted >= MASK_THRESHOLD
    return volume, mask


# ----------------------------------------------------------------------------- dataset


def _assign_splits(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """Stratified split: per class, shuffle deterministically and cut by `fractions`.

    Every split with a positive fraction gets at least one subject per class when the
    class is large enough, so tiny datasets still have val/test examples of both classes.
    """
    if len(fractions) != len(SPLIT_NAMES) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split must be 3 fractions summing to 1, got {fractions}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    assigned = [""] * len(labels)
    for cls in sorted(set(labels)):
        members = rng.permutation([i for i, y in enumerate(labels) if y == cls])
        counts = _split_counts(len(members), fractions)
        names = np.repeat(SPLIT_NAMES, counts)
        for i, name in zip(members, names):
            assigned[i] = str(name)
    return assigned


def _split_counts(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Largest-remainder apportionment of n items, lifting empty positive splits when possible."""
    raw = np.asarray(fractions) * n
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    for k in np.nonzero((counts == 0) & (np.asarray(fractions) > 0))[0]:
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts


def generate_dataset(
    out_dir: Path,
    n_subjects: int,
    seed: int,
    resolution_mm: int = 2,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    n_dicom: int = 2,
) -> Path:
    """Write a balanced CN/AD dataset (NIfTI images + masks + CSV/JSON index); returns out_dir.

    Subject i (id S{i+1:04d}, label i % 2) is generated from SeedSequence((seed, i)), so
    results do not depend on generation order or n_subjects. The first ``n_dicom`` subjects
    are also written as an MR DICOM series ``dicom/{subject}/`` (one file per k-slice, made-up
    patient tags; ``dicom_path`` column, empty for the others). Paths in subjects.csv are
    relative to out_dir.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    template, brain_mask, affine = dataset_grid(resolution_mm)
    atlas_labels, regions = build_atlas(brain_mask, affine)
    save_nifti(out_dir / "template.nii.gz", template, affine)
    save_nifti(out_dir / "brain_mask.nii.gz", brain_mask.astype(np.uint8), affine)
    write_atlas(out_dir / "atlas.nii.gz", out_dir / "atlas_labels.csv", atlas_labels, regions, affine)

    labels = [i % 2 for i in range(n_subjects)]
    splits = _assign_splits(labels, split, seed)
    rows = []
    for i in tqdm(range(n_subjects), desc="synthetic MRI", disable=not progress):
        subject_id = f"S{i + 1:04d}"
        rng = np.random.default_rng(np.random.SeedSequence((seed, i)))
        volume, mask = generate_subject(rng, labels[i], template, brain_mask, affine, (atlas_labels, regions))
        image_path, mask_path = f"images/{subject_id}.nii.gz", f"masks/{subject_id}.nii.gz"
        save_nifti(out_dir / image_path, volume, affine)
        save_nifti(out_dir / mask_path, mask, affine)
        dicom_path = ""
        if i < n_dicom:
            dicom_path = f"dicom/{subject_id}"
            write_series(volume, affine, out_dir / dicom_path, subject_id, seed, subject_index=i)
        rows.append([subject_id, splits[i], labels[i], CLASS_NAMES[labels[i]], image_path, mask_path, dicom_path])

    with open(out_dir / "subjects.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject_id", "split", "label", "label_name", "path", "mask_path", "dicom_path"])
        writer.writerows(rows)
    _write_manifest(out_dir, seed, resolution_mm, template.shape, affine, labels, splits, split)
    return out_dir


def _write_manifest(
    out_dir: Path,
    seed: int,
    resolution_mm: int,
    shape: tuple[int, ...],
    affine: np.ndarray,
    labels: Sequence[int],
    splits: Sequence[str],
    fractions: Sequence[float],
) -> None:
    """dataset.json: provenance and counts so consumers can check what they train on."""
    counts: dict[str, object] = {"total": len(labels)}
    counts.update({name: labels.count(k) for k, name in enumerate(CLASS_NAMES)})
    for split_name in SPLIT_NAMES:
        in_split = [y for y, s in zip(labels, splits) if s == split_name]
        counts[split_name] = {name: in_split.count(k) for k, name in enumerate(CLASS_NAMES)}
    manifest = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "resolution_mm": resolution_mm,
        "shape": list(shape),
        "affine": np.asarray(affine).tolist(),
        "space": "MNI152 (nilearn-shipped template, seed grid 193x229x193 at 1 mm)",
        "class_names": list(CLASS_NAMES),
        "split_fractions": list(fractions),
        "counts": counts,
        "mask_threshold": MASK_THRESHOLD,
        "atrophy_regions": list(AD_REGION_WEIGHTS) + [VENTRICLE_REGION],
    }
    (out_dir / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")
