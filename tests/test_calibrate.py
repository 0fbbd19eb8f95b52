"""The full-mammogram operating point: chosen on held-out data, applied by the engine, reported."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.bundle import ModelBundle
from model_store import calibrate
from model_store.calibrate import choose_threshold, full_image_scores


def test_youden_threshold_separates_known_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    truth = np.array([False, False, False, True, True, True])
    decision = choose_threshold(scores, truth)
    assert 0.3 < decision["full_image_threshold"] <= 0.7
    assert decision["sensitivity"] == decision["specificity"] == 1.0
    with pytest.raises(ValueError):
        choose_threshold(scores, np.ones(6, bool))


def _full_images(data_dir, n=4):
    with open(data_dir / "images.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return [(data_dir / r["path"]).read_bytes() for r in rows[:n]]


@pytest.mark.parametrize("threshold, expect_normal", [(1.01, True), (0.0, False)])
def test_engine_applies_the_operating_point(ddsm_bundle, ddsm_data, tmp_path, threshold, expect_normal):
    bundle = ModelBundle.load(ddsm_bundle[0])
    bundle.decision = {"full_image_threshold": threshold}
    engine = Engine.from_model_dir(bundle.save(tmp_path / "bundle"))
    for result in engine.run([EngineRequest(b, {"top_k": 2}) for b in _full_images(ddsm_data)]):
        assert isinstance(result, dict), result
        decision = result["prediction"]["decision"]
        assert decision["threshold"] == threshold
        assert (result["prediction"]["label"] == "normal") is expect_normal
        assert result["target"]["index"] == result["prediction"]["label_index"]
        lesion = max(v for k, v in result["input"]["class_scores"].items() if k != "normal")
        assert decision["lesion_score"] == pytest.approx(lesion)


def test_scores_come_from_the_serving_engine(ddsm_bundle, ddsm_data):
    bundle = ModelBundle.load(ddsm_bundle[0])
    scores, truth = full_image_scores(bundle, ddsm_data, "test", limit=3, progress=False)
    engine = Engine.from_model_dir(ddsm_bundle[0])
    results = engine.run([EngineRequest(b, {"top_k": 0}) for b in _full_images(ddsm_data, 3)])
    online = [max(v for k, v in r["input"]["class_scores"].items() if k != "normal") for r in results]
    np.testing.assert_allclose(scores, online, rtol=1e-6)
    assert len(truth) == 3


def test_a_calibration_set_can_give_every_image(ddsm_data):
    """``split="all"``: a set generated apart from training calibrates on all its images, in file order."""
    every = calibrate._rows(ddsm_data, calibrate.ALL_SPLITS)
    splits = {s: calibrate._rows(ddsm_data, s) for s in ("train", "val", "test")}
    assert len(every) == sum(len(rows) for rows in splits.values()) and all(splits.values())
    assert {r["image_id"] for r in every} == {r["image_id"] for rows in splits.values() for r in rows}
