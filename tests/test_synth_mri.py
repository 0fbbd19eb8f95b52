"""Tests for the synthetic ADNI replacement (model_store.synth.mri / .atlas).

Run at 3 mm (and 2 mm for the atlas) so the whole module takes seconds; the 1 mm grid
is only loaded, never used to generate subjects.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nilearn import datasets

from medxplain_models.adni import POOL_SIZES, conv_output_shape
from medxplain_models.atlas import Region, build_atlas, load_atlas, write_atlas
from model_store.synth import mri

N_SUBJECTS = 6
SEED = 11
TARGET_BASES = ("Hippocampus", "Amygdala", "ParaHippocampal", "Temporal_Inf", "Temporal_Mid")


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    """Apply a 4x4 affine to a (3,) point or (3, n) points."""
    ijk = np.asarray(ijk, dtype=float)
    return (affine[:3, :3] @ ijk.reshape(3, -1) + affine[:3, 3:4]).reshape(ijk.shape)


def _ids(regions: list[Region], bases: tuple[str, ...]) -> list[int]:
    return [r.index for r in regions if r.name.removesuffix(f"_{r.hemisphere}") in bases]


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((seed, index)))


@pytest.fixture(scope="module")
def grid3() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return mri.dataset_grid(3)


@pytest.fixture(scope="module")
def atlas3(grid3) -> tuple[np.ndarray, list[Region]]:
    return build_atlas(grid3[1], grid3[2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return mri.generate_dataset(
        tmp_path_factory.mktemp("synth"), n_subjects=N_SUBJECTS, seed=SEED, resolution_mm=3, progress=False
    )


@pytest.fixture(scope="module")
def subjects(dataset) -> list[dict[str, str]]:
    with open(dataset / "subjects.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(dataset: Path, relative: str) -> np.ndarray:
    return np.asarray(nib.load(str(dataset / relative)).dataobj)


# ----------------------------------------------------------------------------- grid


def test_template_grid_1mm_keeps_nilearn_world_coordinates():
    template, brain, affine = mri.template_grid(1)
    assert template.shape == brain.shape == mri.SEED_SHAPE
    assert template.dtype == np.float32 and brain.dtype == bool
    assert np.allclose(affine[:3, :3], np.eye(3))
    assert template.min() >= 0 and np.isclose(template.max(), 1.0)
    assert not template[~brain].any()

    source = datasets.load_mni152_template(resolution=1)
    grid_centre = _world(affine, (np.array(mri.SEED_SHAPE) - 1) / 2)
    source_centre = _world(source.affine, (np.array(source.shape) - 1) / 2)
    assert np.abs(grid_centre - source_centre).max() <= 2.0

    origin = np.rint(np.linalg.inv(affine) @ [0, 0, 0, 1])[:3].astype(int)
    assert np.all(origin >= 0) and np.all(origin < mri.SEED_SHAPE)
    assert brain[tuple(origin)], "MNI (0,0,0) near the anterior commissure must lie in the brain"

    # The same world point must hold the same (rescaled) template value in both grids.
    voxels = np.argwhere(brain)[::997].T
    source_voxels = np.rint(_world(np.linalg.inv(source.affine), _world(affine, voxels))).astype(int)
    source_values = np.asarray(source.dataobj)[tuple(source_voxels)]
    keep = source_values > 0.1
    ratio = template[tuple(voxels)][keep] / source_values[keep]
    assert np.ptp(ratio) < 1e-4


@pytest.mark.parametrize("resolution, shape", [(2, (97, 115, 97)), (3, (65, 77, 65))])
def test_coarse_grid_block_averages_the_1mm_grid(resolution, shape):
    fine, fine_brain, fine_affine = mri.template_grid(1)
    template, brain, affine = mri.template_grid(resolution)
    assert template.shape == brain.shape == shape
    assert np.allclose(affine[:3, :3], resolution * np.eye(3))
    block_centre = np.full(3, (resolution - 1) / 2)
    assert np.allclose(_world(affine, [0, 0, 0]), _world(fine_affine, block_centre))
    assert abs(brain.sum() * resolution**3 / fine_brain.sum() - 1) < 0.03

    # Each interior coarse voxel is the mean of its fine block, up to one rescaling to [0, 1].
    blocks = [tuple(slice(i * resolution, (i + 1) * resolution) for i in ijk) for ijk in np.argwhere(brain)[::499]]
    blocks = [block for block in blocks if fine_brain[block].all()]
    ratio = np.array([template[tuple(s.start // resolution for s in b)] / fine[b].mean() for b in blocks])
    assert np.ptp(ratio) / ratio.mean() < 1e-4


@pytest.mark.parametrize("resolution, shape", [(1, (193, 229, 193)), (2, (78, 115, 78)), (3, (78, 78, 78))])
def test_dataset_grid_keeps_every_brain_voxel_in_the_networks_view(resolution, shape):
    """The unpadded convs and max-pools drop trailing voxels: none of them may hold brain."""
    template, brain, affine = mri.dataset_grid(resolution)
    full, full_brain, full_affine = mri.template_grid(resolution)
    assert template.shape == brain.shape == shape
    assert brain.sum() == full_brain.sum()  # cut margins only, never brain
    # The network's geometry with every path open: 3x3x3 all-ones convs (no padding) and average pools of
    # the model's sizes (floor rounding, as its max-pools); a voxel with no gradient is never read.
    probe = torch.ones((1, 1, *shape), requires_grad=True)
    x = probe
    for pool in POOL_SIZES:
        x = F.avg_pool3d(F.conv3d(x, torch.ones(1, 1, 3, 3, 3)), pool)
    assert tuple(x.shape[2:]) == conv_output_shape(shape)
    x.sum().backward()
    seen = probe.grad[0, 0].numpy() != 0
    assert seen[brain].all()
    # the same world point holds the same template value on both grids
    ijk = np.argwhere(brain)[:: max(1, int(brain.sum()) // 50)]
    full_ijk = np.rint((np.linalg.inv(full_affine) @ affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T).astype(int)
    assert np.array_equal(template[tuple(ijk.T)], full[tuple(full_ijk.T)])


def test_template_grid_rejects_unsupported_resolution():
    with pytest.raises(ValueError):
        mri.template_grid(4)


# ----------------------------------------------------------------------------- atlas


@pytest.mark.parametrize("resolution", [2, 3])
def test_atlas_labels_every_brain_voxel_once_with_lr_pairs(resolution):
    _, brain, affine = mri.template_grid(resolution)
    labels, regions = build_atlas(brain, affine)
    assert labels.dtype == np.int16 and labels.shape == brain.shape
    assert np.array_equal(labels > 0, brain)
    assert [r.index for r in regions] == list(range(1, len(regions) + 1))
    assert len({r.name for r in regions}) == len(regions)
    assert 40 <= len(regions) <= 60
    assert set(np.unique(labels[brain])) == {r.index for r in regions}

    by_name = {r.name: r for r in regions}
    lefts = [r for r in regions if r.hemisphere == "L"]
    assert lefts and any(r.hemisphere == "M" for r in regions)
    assert len(lefts) == sum(r.hemisphere == "R" for r in regions)
    for left in lefts:
        right = by_name[left.name.removesuffix("_L") + "_R"]
        left_x = _world(affine, np.argwhere(labels == left.index).T.mean(axis=1))[0]
        right_x = _world(affine, np.argwhere(labels == right.index).T.mean(axis=1))[0]
        assert left_x < 0 < right_x, left.name
    for base in TARGET_BASES:
        assert f"{base}_L" in by_name and f"{base}_R" in by_name


def test_write_then_load_atlas_is_identity(tmp_path, grid3, atlas3):
    labels, regions = atlas3
    write_atlas(tmp_path / "a.nii.gz", tmp_path / "a.csv", labels, regions, grid3[2])
    loaded, loaded_regions = load_atlas(tmp_path / "a.nii.gz", tmp_path / "a.csv", labels.shape, grid3[2])
    assert np.array_equal(loaded, labels) and loaded.dtype == np.int16
    assert loaded_regions == regions


def test_load_atlas_resamples_user_atlas_onto_grid(tmp_path, grid3, atlas3):
    _, brain2, affine2 = mri.template_grid(2)
    labels2, regions = build_atlas(brain2, affine2)
    path = tmp_path / "user_atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels2.astype(np.int32), affine2), str(path))
    table = tmp_path / "user_atlas.txt"  # AAL-style: whitespace, no header, hemisphere in the name
    table.write_text("".join(f"{r.index} {r.name} {2000 + r.index}\n" for r in regions))

    labels, loaded_regions = load_atlas(path, table, grid3[0].shape, grid3[2])
    assert labels.shape == grid3[0].shape and labels.dtype == np.int16
    assert set(np.unique(labels)) <= {0} | {r.index for r in regions}
    assert [(r.index, r.name, r.hemisphere) for r in loaded_regions] == [
        (r.index, r.name, r.hemisphere) for r in regions
    ]
    assert np.mean(labels[grid3[1]] == atlas3[0][grid3[1]]) > 0.85

    with pytest.raises(ValueError):
        load_atlas(path, table, grid3[0].shape, None)


# ----------------------------------------------------------------------------- subjects


def test_generate_subject_is_deterministic(grid3, atlas3):
    first = mri.generate_subject(_subject_rng(5, 0), 1, *grid3, atlas3)
    again = mri.generate_subject(_subject_rng(5, 0), 1, *grid3, atlas3)
    other = mri.generate_subject(_subject_rng(6, 0), 1, *grid3, atlas3)
    assert first[0].dtype == np.float32 and first[1].dtype == np.uint8
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_cn_and_ad_from_same_rng_differ_only_by_planted_atrophy(grid3, atlas3):
    brain = grid3[1]
    cn, cn_mask = mri.generate_subject(_subject_rng(3, 1), 0, *grid3, atlas3)
    ad, ad_mask = mri.generate_subject(_subject_rng(3, 1), 1, *grid3, atlas3)
    assert not cn_mask.any() and ad_mask.any()
    inside, outside = ad_mask > 0, brain & (ad_mask == 0)
    assert (cn - ad)[inside].mean() > 0.05
    assert np.abs(cn - ad)[outside].mean() < 0.005
    assert not cn[~brain].any() and not ad[~brain].any()


def test_generate_subject_rejects_bad_label_and_foreign_atlas(grid3, atlas3):
    with pytest.raises(ValueError):
        mri.generate_subject(_subject_rng(0, 0), 2, *grid3, atlas3)
    renamed = [Region(r.index, f"Area{r.index}", r.hemisphere) for r in atlas3[1]]
    with pytest.raises(ValueError, match="Hippocampus"):
        mri.generate_subject(_subject_rng(0, 0), 1, *grid3, (atlas3[0], renamed))


# ----------------------------------------------------------------------------- dataset


def test_dataset_layout_and_manifest(dataset, subjects):
    for name in ("template.nii.gz", "brain_mask.nii.gz", "atlas.nii.gz", "atlas_labels.csv", "dataset.json"):
        assert (dataset / name).is_file(), name
    assert [s["subject_id"] for s in subjects] == [f"S{i:04d}" for i in range(1, N_SUBJECTS + 1)]
    assert list(subjects[0]) == ["subject_id", "split", "label", "label_name", "path", "mask_path", "dicom_path"]
    for s in subjects:
        assert mri.CLASS_NAMES[int(s["label"])] == s["label_name"]
        assert (dataset / s["path"]).is_file() and (dataset / s["mask_path"]).is_file()
    assert sorted(s["label_name"] for s in subjects) == ["AD"] * 3 + ["CN"] * 3
    for split in mri.SPLIT_NAMES:  # 3 per class and 3 splits: each split gets one of each
        assert sorted(s["label_name"] for s in subjects if s["split"] == split) == ["AD", "CN"]

    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["class_names"] == ["CN", "AD"]
    assert manifest["seed"] == SEED and manifest["resolution_mm"] == 3
    assert manifest["shape"] == [78, 78, 78]  # the 65x77x65 template grid padded to the network's view
    assert manifest["counts"]["total"] == N_SUBJECTS
    assert manifest["counts"]["CN"] == manifest["counts"]["AD"] == 3
    assert manifest["counts"]["test"] == {"CN": 1, "AD": 1}


def test_nifti_files_round_trip_on_the_grid(dataset, subjects, grid3, atlas3):
    template, brain, affine = grid3
    for s in subjects[:2]:
        for relative, dtype in ((s["path"], np.float32), (s["mask_path"], np.uint8)):
            img = nib.load(str(dataset / relative))
            assert img.shape == template.shape
            assert np.allclose(img.affine, affine) and np.allclose(img.header.get_sform(), affine)
            assert np.asarray(img.dataobj).dtype == dtype
    assert np.array_equal(_load(dataset, "template.nii.gz"), template)
    assert np.array_equal(_load(dataset, "brain_mask.nii.gz") > 0, brain)
    labels, regions = load_atlas(dataset / "atlas.nii.gz", dataset / "atlas_labels.csv")
    assert np.array_equal(labels, atlas3[0]) and regions == atlas3[1]


def test_masks_are_empty_for_cn_and_temporal_for_ad(dataset, subjects, grid3, atlas3):
    brain = grid3[1]
    labels, regions = atlas3
    targets = np.isin(labels, _ids(regions, TARGET_BASES + (mri.VENTRICLE_REGION,)))
    for s in subjects:
        mask = _load(dataset, s["mask_path"]) > 0
        if s["label_name"] == "CN":
            assert not mask.any(), s["subject_id"]
            continue
        assert mask.sum() > 500, s["subject_id"]
        assert not (mask & ~brain).any()
        assert (mask & targets).sum() / mask.sum() > 0.5
        for base in ("Hippocampus", "Temporal_Inf", "Temporal_Mid"):
            for side in ("L", "R"):
                region = labels == next(r.index for r in regions if r.name == f"{base}_{side}")
                assert (mask & region).sum() > 0.3 * region.sum(), f"{s['subject_id']} {base}_{side}"


def test_ad_is_darker_than_cn_inside_the_atrophy_masks(dataset, subjects):
    ad = [s for s in subjects if s["label_name"] == "AD"]
    cn = [_load(dataset, s["path"]) for s in subjects if s["label_name"] == "CN"]
    for s in ad:
        mask = _load(dataset, s["mask_path"]) > 0
        ad_mean = _load(dataset, s["path"])[mask].mean()
        cn_mean = np.mean([volume[mask].mean() for volume in cn])
        assert ad_mean < 0.93 * cn_mean, s["subject_id"]


def test_dataset_is_reproducible_and_independent_of_size(dataset, tmp_path):
    small = mri.generate_dataset(tmp_path / "same", n_subjects=2, seed=SEED, resolution_mm=3, progress=False)
    other = mri.generate_dataset(tmp_path / "other", n_subjects=2, seed=SEED + 1, resolution_mm=3, progress=False)
    for subject in ("S0001", "S0002"):
        image, mask = f"images/{subject}.nii.gz", f"masks/{subject}.nii.gz"
        assert np.array_equal(_load(small, image), _load(dataset, image))
        assert np.array_equal(_load(small, mask), _load(dataset, mask))
        assert not np.array_equal(_load(other, image), _load(dataset, image))
