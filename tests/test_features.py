"""Per-item features for batch analyses agree with what the online response reports."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from medxplain_engine.engine import Engine, EngineRequest


@pytest.fixture(scope="module")
def full_image_result(ddsm_bundle, ddsm_data):
    with open(ddsm_data / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test" and r["label"] != "0")
    engine = Engine.from_model_dir(ddsm_bundle[0])
    (out,) = engine.run_prepared([engine.prepare(EngineRequest((ddsm_data / row["path"]).read_bytes(), {"top_k": 5}))],
                                 with_features=True)
    assert not isinstance(out, Exception), out
    return out.response, out.features


def test_contributions_match_the_ranked_units(full_image_result):
    response, features = full_image_result
    target = response["target"]["index"]
    for unit in response["units"]:
        assert features.contributions[target, unit["unit"]] == pytest.approx(unit["contribution"], rel=1e-5)
        assert features.pooled[unit["unit"]] == pytest.approx(unit["activation"], rel=1e-6)
    names = list(response["prediction"]["probabilities"])
    per_class = features.top_units_per_class(names, k=8)
    assert list(per_class) == names
    for units in per_class.values():
        values = [u["contribution"] for u in units]
        assert values == sorted(values, reverse=True) and len(units) == 8
    assert [u["unit"] for u in per_class[names[target]][:5]] == [u["unit"] for u in response["units"]]


def test_class_map_is_the_full_image_probability_map(full_image_result):
    response, features = full_image_result
    assert features.class_map.shape == (3, *response["input"]["map_shape"])
    np.testing.assert_allclose(features.class_map.sum(axis=0), 1.0, atol=1e-5)
    maxima = features.class_map.reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(maxima, list(response["input"]["class_scores"].values()), rtol=1e-6)
