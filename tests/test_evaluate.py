"""Explanation-quality metrics on hand-made maps, and small end-to-end evaluation runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.ddsm import DDSMConfig, DDSMResNet
from model_store.__main__ import main
from model_store.evaluate import (
    PLANTED,
    cascade,
    ddsm_cases,
    lesion_patch,
    mass_accuracy,
    pairwise_l2,
    pointing_game,
    rank_accuracy,
    sanity_flag,
    spearman,
)


@pytest.fixture
def square_mask() -> np.ndarray:
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:20, 20:30] = True
    return mask


def test_pointing_game_hits_inside_and_within_tolerance(square_mask):
    heat = np.zeros(square_mask.shape)
    heat[15, 25] = 1.0
    assert pointing_game(heat, square_mask) == 1.0
    heat[15, 25], heat[15, 34] = 0.0, 1.0  # 5 px right of the mask
    assert pointing_game(heat, square_mask) == 0.0
    assert pointing_game(heat, square_mask, tolerance=5) == 1.0
    assert pointing_game(heat, square_mask, tolerance=4) == 0.0


def test_pointing_game_counts_tied_maxima_pro_rata(square_mask):
    heat = np.zeros(square_mask.shape)
    heat[15, 25] = heat[35, 5] = 1.0
    assert pointing_game(heat, square_mask) == 0.5


def test_mass_accuracy(square_mask):
    heat = np.where(square_mask, 1.0, -2.0)  # negative relevance outside does not count
    assert mass_accuracy(heat, square_mask) == 1.0
    heat[0, :4] = 25.0  # as much positive mass outside as the 100 mask pixels hold
    assert mass_accuracy(heat, square_mask) == pytest.approx(0.5)
    assert mass_accuracy(-np.ones(square_mask.shape), square_mask) == 0.0


def test_rank_accuracy(square_mask):
    assert rank_accuracy(np.ones(square_mask.shape), square_mask) == pytest.approx(square_mask.mean())
    assert rank_accuracy(square_mask.astype(float), square_mask) == 1.0
    shifted = np.roll(square_mask, 5, axis=1).astype(float)  # half of the top-100 pixels inside
    assert rank_accuracy(shifted, square_mask) == pytest.approx(0.5)


def test_spearman():
    rng = np.random.default_rng(0)
    heat = rng.random((100, 100))
    assert spearman(heat, heat) == pytest.approx(1.0)
    assert spearman(heat, -heat) == pytest.approx(-1.0)
    assert abs(spearman(heat, rng.permutation(heat.ravel()).reshape(heat.shape))) < 0.05
    assert spearman(heat, np.zeros_like(heat)) == 0.0
    where = np.zeros(heat.shape, dtype=bool)
    where[:10] = True
    assert spearman(heat, np.where(where, heat, 0.0), where) == pytest.approx(1.0)


def test_pairwise_l2_and_sanity_flag():
    maps = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    assert pairwise_l2(maps) == {"a": {"a": 0.0, "b": pytest.approx(2**0.5)},
                                 "b": {"a": pytest.approx(2**0.5), "b": 0.0}}
    assert sanity_flag(0.1, 0.2) == "ok"
    assert sanity_flag(0.8, 0.2) == "top-layer insensitive"
    assert sanity_flag(0.9, 0.7) == "fail"


def test_cascade_runs_from_the_output_down():
    assert cascade(DDSMResNet(DDSMConfig(depth=18))) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]


def test_lesion_patch_holds_the_lesion():
    image = np.zeros((400, 300), dtype=np.uint16)
    mask = np.zeros(image.shape, dtype=bool)
    mask[300:320, 250:270] = True
    image[mask] = 60000
    patch, patch_mask = lesion_patch(image, mask, np.random.default_rng(0))
    assert patch.shape == patch_mask.shape == (227, 227)
    bright = patch > 0.5
    assert (bright & patch_mask).sum() / (bright | patch_mask).sum() > 0.9  # mask and image stay aligned


def test_evaluate_end_to_end(ddsm_bundle, ddsm_data, tmp_path):
    out, md, bundle = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "bundle"
    shutil.copytree(ddsm_bundle[0], bundle)  # --card writes into the bundle: not into the session's
    assert main(["evaluate", "--model", "ddsm", "--bundle", str(bundle), "--data", str(ddsm_data),
                 "--limit", "2", "--methods", "cam,gradcam", "--patch-methods", "cam", "--out", str(out),
                 "--markdown", str(md), "--curve-steps", "4", "--card"]) == 0
    report = json.loads(out.read_text())
    stages = report["settings"]["randomisation"]["stages"]
    assert stages == ["fc", "conv1"]
    assert set(report["evaluations"]) == {"full_image", "patch"}
    full = report["evaluations"]["full_image"]
    assert full["cases"] == 2 and set(full["methods"]) == {"cam", "gradcam"}
    for result in full["methods"].values():
        for key in ("pointing_game", "mass_accuracy", "rank_accuracy"):
            assert 0.0 <= result[key] <= 1.0
        assert set(result["randomisation_spearman"]) == set(stages)
        assert result["sanity"] in ("ok", "top-layer insensitive", "fail")
        assert 0.0 <= result["deletion_auc"] <= 1.0 and 0.0 <= result["insertion_auc"] <= 1.0
        assert len(result["curves"]["deletion"]) == len(result["curves"]["insertion"]) == 5
    assert full["curves"]["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert 0.0 <= full["chance"]["deletion_auc"] <= 1.0  # a random pixel order on the same cases
    for setting in ("full_image", "patch"):
        cam = report["evaluations"][setting]["methods"]["cam"]["randomisation_spearman"]
        assert max(cam.values()) < 1.0
    text = md.read_text()
    assert "| cam |" in text and report["model"]["weights_sha256"] in text
    assert "deletion AUC" in text and "insertion AUC" in text
    # the card now carries each method's sanity flag and pointing game, and the engine serves them
    engine = Engine.from_model_dir(bundle)
    described = engine.describe_methods()
    for setting in ("full_image", "patch"):
        for method, result in report["evaluations"][setting]["methods"].items():
            quality = described[method]["quality"][setting]
            assert quality["sanity"] == result["sanity"] and quality["cases"] == report["evaluations"][setting]["cases"]
            assert quality["pointing_game"] == pytest.approx(result["pointing_game"], abs=1e-4)
    assert "quality" not in described["saliency"]  # not evaluated: nothing claimed
    (response,) = engine.run([EngineRequest(ddsm_cases(ddsm_data, "test", 1)[0].payload, {"explain": "cam"})])
    assert response["heatmaps"]["cam"]["quality"]["full_image"]["sanity"] == report["evaluations"]["full_image"][
        "methods"]["cam"]["sanity"]
    assert engine.describe()["quality_source"]["split"] == "test"


def test_evaluate_adni_ranks_regions_against_the_planted_atrophy(adni_bundle, adni_data, tmp_path):
    """The region tables carry the ground truth ranked like a map, and a first-region check per method."""
    out, md = tmp_path / "adni.json", tmp_path / "adni.md"
    assert main(["evaluate", "--model", "adni", "--bundle", str(adni_bundle[0]), "--data", str(adni_data),
                 "--limit", "2", "--methods", "gradcam,sensitivity", "--gradcam-layer", "relu_2",
                 "--curve-steps", "0", "--out", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["gradcam_layer"] == "relu_2"
    volume = report["evaluations"]["volume"]
    planted = json.loads((adni_data / "dataset.json").read_text())["atrophy_regions"]
    assert volume["planted_regions"] == planted
    truth = volume["regions_by_density"][PLANTED]
    # the mask's own ranking: its densest regions are the ones the generator planted in
    assert all(row["name"].removesuffix("_L").removesuffix("_R") in planted for row in truth[:4])
    assert truth[0]["enrichment"] > 5 and volume["first_region"][PLANTED]["by_density"]["planted"]
    for method in ("gradcam", "sensitivity"):
        rows = volume["regions_by_density"][method]
        assert [r["per_voxel"] for r in rows] == sorted((r["per_voxel"] for r in rows), reverse=True)
        first = volume["first_region"][method]["by_density"]
        assert first["name"] == rows[0]["name"]
        assert first["planted"] == (rows[0]["name"].removesuffix("_L").removesuffix("_R") in planted)
    text = md.read_text()
    assert "relevance per voxel" in text and "First region of each mean map" in text and "`relu_2`" in text
