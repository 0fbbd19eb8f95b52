"""Tests of the synthetic mammography generator and of DeepMiner tiling."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from medxplain_models.tiling import PATCH_SIZE, Tile, extract_patch, label_components, tile_grid, tile_label
from model_store.synth.mammo import (
    LESION_KINDS,
    build_patch_set,
    generate_dataset,
    generate_view,
    read_images_csv,
)

N_CASES, SEED, HEIGHT, WIDTH = 6, 0, 448, 300
BREAST_MIN = 0.08 * 65535  # every breast pixel is brighter; air is ~0.01


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", N_CASES, SEED, HEIGHT, WIDTH, progress=False)


@pytest.fixture(scope="module")
def rows(dataset: Path) -> list[dict]:
    return read_images_csv(dataset)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _files(root: Path) -> dict[str, bytes]:
    """Generated files by relative path (patch caches are added later by tests)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("patches_")
    }


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", N_CASES, SEED, HEIGHT, WIDTH, progress=False)
    first, second = _files(dataset), _files(again)
    assert len(first) == 4 * N_CASES * 2 + 4 + 3  # images, masks, dicoms, csv + 2 json
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_cases_do_not_depend_on_dataset_size_and_seed_matters(dataset: Path, tmp_path: Path) -> None:
    smaller = generate_dataset(tmp_path / "small", 3, SEED, HEIGHT, WIDTH, n_dicom=0, progress=False)
    other = generate_dataset(tmp_path / "other", 3, SEED + 1, HEIGHT, WIDTH, n_dicom=0, progress=False)
    for name in ("C0001_LEFT_CC", "C0002_RIGHT_MLO", "C0003_LEFT_MLO"):
        path = f"images/{name}.png"
        assert (smaller / path).read_bytes() == (dataset / path).read_bytes()
        assert not np.array_equal(_load(other / path), _load(dataset / path))


# --------------------------------------------------------------------------- content


def test_masks_match_case_labels(dataset: Path, rows: list[dict]) -> None:
    lesions = json.loads((dataset / "lesions.json").read_text())
    by_case: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        mask = _load(dataset / row["mask_path"])
        assert mask.dtype == np.uint8 and mask.shape == (HEIGHT, WIDTH)
        assert row["label"] == mask.max()
        assert bool(lesions[row["image_id"]]) == (row["label"] > 0)
        assert all(les["class"] == row["label"] for les in lesions[row["image_id"]])
        by_case[row["case_id"]].append(row)
    assert len(by_case) == N_CASES
    assert sorted(r[0]["case_label"] for r in by_case.values()) == [0, 0, 1, 1, 2, 2]
    for views in by_case.values():
        case_label = views[0]["case_label"]
        assert len(views) == 4
        lesion_sides = {v["side"] for v in views if v["label"] > 0}
        assert max(v["label"] for v in views) == case_label
        if case_label:
            assert len(lesion_sides) == 1  # one breast, seen in both its views
            assert sum(v["label"] == case_label for v in views) == 2
        else:
            assert not lesion_sides


def test_images_are_16_bit_with_chest_wall_on_the_laterality_edge(dataset: Path, rows: list[dict]) -> None:
    for row in rows:
        image = _load(dataset / row["path"])
        assert image.dtype == np.uint16 and image.shape == (HEIGHT, WIDTH)
        assert image.max() > 30000
        chest, far = (0, -1) if row["side"] == "LEFT" else (-1, 0)
        assert (image[:, chest] > BREAST_MIN).mean() > 0.5
        assert (image[:, far] > BREAST_MIN).mean() == 0


def test_lesions_lie_inside_the_breast_and_stand_out(dataset: Path, rows: list[dict]) -> None:
    lesions = json.loads((dataset / "lesions.json").read_text())
    for row in (r for r in rows if r["label"]):
        image = _load(dataset / row["path"]).astype(np.float64)
        mask = _load(dataset / row["mask_path"]) > 0
        assert image[mask].min() > BREAST_MIN
        for les in lesions[row["image_id"]]:
            y0, x0, y1, x1 = les["bbox"]
            assert 0 <= y0 < y1 <= HEIGHT and 0 <= x0 < x1 <= WIDTH
            assert mask[y0:y1, x0:x1].sum() == les["area"]
        ring = ndimage.binary_dilation(mask, iterations=8) & ~mask
        assert image[mask].max() > np.percentile(image[ring], 95) + 0.08 * 65535


@pytest.mark.parametrize("label,kind", [(c, k) for c, kinds in LESION_KINDS.items() for k in kinds])
def test_every_lesion_kind_renders_inside_the_view(label: int, kind: str) -> None:
    image, mask, records = generate_view(np.random.default_rng(3), label, "RIGHT", "MLO", HEIGHT, WIDTH, kinds=[kind])
    assert [r["kind"] for r in records] == [kind]
    assert mask.max() == label and set(np.unique(mask)) == {0, label}
    assert (mask > 0).sum() == records[0]["area"]
    assert image[mask > 0].min() > BREAST_MIN


def test_generate_view_rejects_kinds_of_another_class() -> None:
    with pytest.raises(ValueError):
        generate_view(np.random.default_rng(0), 1, "LEFT", "CC", HEIGHT, WIDTH, kinds=["mass_spiculated"])
    with pytest.raises(ValueError):
        generate_view(np.random.default_rng(0), 0, "LEFT", "CC", HEIGHT, WIDTH, kinds=["mass_round"])


def test_split_is_by_case(dataset: Path, rows: list[dict]) -> None:
    split_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        split_of[row["case_id"]].add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {s for (s,) in split_of.values()} <= {"train", "val", "test"}
    summary = json.loads((dataset / "dataset.json").read_text())
    counted = {s: sum(c.values()) for s, c in summary["counts"]["cases"].items()}
    assert counted == {s: sum(next(iter(v)) == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert summary["class_names"] == ["normal", "benign", "malignant"] and summary["seed"] == SEED
    # stratified: each class has 2 cases here -> one train case, the rounding leftover in val
    assert summary["counts"]["cases"]["train"] == {"normal": 1, "benign": 1, "malignant": 1}
    assert summary["counts"]["cases"]["val"] == {"normal": 1, "benign": 1, "malignant": 1}


def test_dicom_files_carry_synthetic_patient_tags(dataset: Path, rows: list[dict]) -> None:
    with_dicom = [r for r in rows if r["dicom_path"]]
    assert [r["image_id"] for r in with_dicom] == [r["image_id"] for r in rows[:4]]
    for row in with_dicom:
        ds = pydicom.dcmread(dataset / row["dicom_path"])
        case_number = int(row["case_id"][1:])
        assert ds.Modality == "MG"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.PatientName == f"SYNTHETIC^PATIENT{case_number}"
        assert ds.PatientID == f"SYN-PID-{case_number:06d}"
        assert len(ds.PatientBirthDate) == 8
        assert (ds.ImageLaterality, ds.ViewPosition) == (row["side"][0], row["view"])
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 16
        np.testing.assert_array_equal(ds.pixel_array, _load(dataset / row["path"]))


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("height,width", [(HEIGHT, WIDTH), (1400, 908), (500, 500), (301, 1000)])
def test_tile_grid_covers_image_with_quarter_side_tiles(height: int, width: int) -> None:
    tiles = tile_grid(height, width)
    side = min(height, width) // 4
    assert len(set(tiles)) == len(tiles)
    assert all(t.size == side for t in tiles)
    coverage = np.zeros((height, width), np.int32)
    for t in tiles:
        assert 0 <= t.y <= height - side and 0 <= t.x <= width - side
        coverage[t.y : t.y + side, t.x : t.x + side] += 1
    assert coverage.min() >= 1
    for starts, length in ((sorted({t.y for t in tiles}), height), (sorted({t.x for t in tiles}), width)):
        assert starts[0] == 0 and starts[-1] == length - side
        assert all(b - a == side // 2 for a, b in itertools.pairwise(starts[:-1]))
        assert 0 < starts[-1] - starts[-2] <= side // 2


def test_tile_grid_rejects_tiny_images() -> None:
    with pytest.raises(ValueError):
        tile_grid(7, 100)


def test_tile_label_rules() -> None:
    mask = np.zeros((400, 400), np.uint8)
    mask[20:30, 20:30] = 2  # small calcification cluster, 1 % of a 100-pixel tile
    mask[40:60, 300:320] = 1  # small 20x20 mass
    mask[150:350, 150:350] = 1  # big mass
    components = label_components(mask)
    assert sorted(components.sizes[1:].tolist()) == [100, 400, 40000]

    def label(y: int, x: int) -> int:
        return tile_label(mask, Tile(y, x, 100), components=components)

    assert label(0, 0) == 2  # whole cluster, although it covers only 1 % of the tile
    assert label(25, 0) == 2  # exactly half of the cluster
    assert label(26, 0) == 0  # 40 % of the cluster and 0.4 % of the tile
    assert label(0, 210) == 1  # half of the small mass
    assert label(0, 209) == 0  # 45 % of the small mass and 1.8 % of the tile
    assert label(280, 280) == 1  # 12 % of the big mass but 49 % of the tile
    assert label(55, 150) == 1  # a 5-row sliver of the big mass = exactly 5 % of the tile
    assert label(54, 150) == 0  # 4 rows = 4 % of the tile, 1 % of the mass
    assert tile_label(mask, Tile(0, 0, 100)) == 2  # components computed on the fly


def test_tile_label_takes_highest_class_and_keeps_touching_classes_apart() -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[10:20, 40:50] = 1
    mask[10:20, 50:60] = 2  # touches the benign lesion but is a separate lesion
    assert sorted(label_components(mask).sizes[1:].tolist()) == [100, 100]
    assert tile_label(mask, Tile(0, 0, 54)) == 1  # 40 % of the malignant one, 1.4 % of tile
    assert tile_label(mask, Tile(0, 0, 55)) == 2  # half of the malignant lesion wins
    assert tile_label(mask, Tile(0, 0, 45)) == 1  # half of the benign one


def test_extract_patch_scales_and_resizes() -> None:
    image16 = np.full((300, 300), 65535, np.uint16)
    patch = extract_patch(image16, Tile(10, 20, 75))
    assert patch.shape == (PATCH_SIZE, PATCH_SIZE) and patch.dtype == np.float32
    np.testing.assert_allclose(patch, 1.0, atol=1e-6)
    image8 = np.zeros((300, 300), np.uint8)
    image8[:, 150:] = 255
    half = extract_patch(image8, Tile(0, 100, 100))
    assert half[:, :100].max() == 0 and half[:, -100:].min() == pytest.approx(1.0)
    assert 0 < half[0, PATCH_SIZE // 2] < 1  # bilinear blend at the edge
    with pytest.raises(TypeError):
        extract_patch(image8.astype(np.int32), Tile(0, 0, 10))


# --------------------------------------------------------------------------- patches


def test_patch_set_is_cached_and_lesion_patches_stand_out(dataset: Path, rows: list[dict]) -> None:
    patches, labels, image_ids, boxes = build_patch_set(dataset, "train", 8, SEED)
    n_train_images = sum(r["split"] == "train" for r in rows)
    assert patches.dtype == np.uint8 and patches.shape[1:] == (PATCH_SIZE, PATCH_SIZE)
    assert len(patches) == len(labels) == len(image_ids) == len(boxes)
    assert (labels == 0).sum() == 8 * n_train_images
    assert set(labels.tolist()) == {0, 1, 2}
    assert (dataset / "patches_train_8.npz").exists()
    cached = build_patch_set(dataset, "train", 8, SEED)
    np.testing.assert_array_equal(cached[0], patches)
    np.testing.assert_array_equal(cached[3], boxes)
    assert cached[2] == image_ids

    flat = patches.reshape(len(patches), -1).astype(np.float64) / 255
    contrast = np.percentile(flat, 99.5, axis=1) - np.median(flat, axis=1)
    tissue_only = flat.min(axis=1) > 0.1  # normal patches fully inside the breast
    assert contrast[labels > 0].mean() > contrast[(labels == 0) & tissue_only].mean() + 0.03
    assert flat[labels > 0].mean() > flat[labels == 0].mean() + 0.1
