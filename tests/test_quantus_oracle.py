"""Our localisation metrics against Quantus 0.6 as an independent oracle, on the same maps and masks.

Maps: the trained test model's own maps (CAM, Grad-CAM, saliency through the serving engine) on the
held-out lesion images, plus seeded random maps on those masks. Where the definitions differ, the
test states how and checks the stated relation instead of equality:
- pointing game: Quantus has no tolerance, so it gets our dilated mask; with tied maxima Quantus
  scores a hit if any maximum hits, ours scores the fraction that do (equal for a unique maximum);
- relevance mass accuracy: ours counts positive relevance only, Quantus sums signed relevance, so
  Quantus gets the map clipped at 0;
- relevance rank accuracy: Quantus breaks ties at the K-th value by sort order, ours counts them
  pro rata (equal when the K-th value is not tied).
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus

from model_store.evaluate import (
    DDSM_TOLERANCE_PX,
    ddsm_cases,
    dilate,
    engine_maps,
    mass_accuracy,
    pointing_game,
    rank_accuracy,
)

TOL = 1e-6


def _quantus(metric, relevance: np.ndarray, mask: np.ndarray) -> float:
    a = relevance.astype(np.float64)[None, None]
    (score,) = metric(normalise=False, abs=False, disable_warnings=True)(
        model=None, x_batch=np.zeros_like(a), y_batch=np.zeros(1, int), a_batch=a,
        s_batch=mask.astype(np.float64)[None, None])
    return float(score)


@pytest.fixture(scope="module")
def maps_and_masks(ddsm_bundle, ddsm_data) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from medxplain_engine.engine import Engine

    engine = Engine.from_model_dir(ddsm_bundle[0])
    out = []
    rng = np.random.default_rng(0)
    for case in ddsm_cases(ddsm_data, "test", limit=3):
        maps, _ = engine_maps(engine, case, ("cam", "gradcam", "saliency"), {})
        out += [(f"{case.case_id}/{m}", r, case.mask) for m, r in maps.items()]
        out.append((f"{case.case_id}/random", rng.normal(size=case.mask.shape), case.mask))
    return out


def test_pointing_game_agrees_with_quantus(maps_and_masks):
    for name, relevance, mask in maps_and_masks:
        grown = dilate(mask, DDSM_TOLERANCE_PX)
        ours, theirs = pointing_game(relevance, mask, DDSM_TOLERANCE_PX), _quantus(quantus.PointingGame, relevance, grown)
        if (relevance == relevance.max()).sum() == 1:
            assert ours == theirs, name
        else:  # tied maxima: the fraction that hits vs "any hits"
            assert ours <= theirs and (ours > 0) == (theirs > 0), name


def test_relevance_mass_accuracy_agrees_with_quantus(maps_and_masks):
    signed = 0
    for name, relevance, mask in maps_and_masks:
        ours = mass_accuracy(relevance, mask)
        assert ours == pytest.approx(_quantus(quantus.RelevanceMassAccuracy, np.clip(relevance, 0, None), mask),
                                     abs=TOL), name
        signed += (relevance < 0).any()
    assert signed  # the clipping is exercised: some maps (random, CAM) carry negative relevance


def test_relevance_rank_accuracy_agrees_with_quantus(maps_and_masks):
    compared = 0
    for name, relevance, mask in maps_and_masks:
        k = int(mask.sum())
        kth = np.sort(relevance.ravel())[::-1][k - 1]
        if (relevance == kth).sum() > 1:  # tied at the cut: ours is the expectation over tie orders
            continue
        assert rank_accuracy(relevance, mask) == pytest.approx(_quantus(quantus.RelevanceRankAccuracy, relevance, mask),
                                                               abs=TOL), name
        compared += 1
    assert compared >= len(maps_and_masks) // 2, compared


def test_tied_cut_is_the_mean_over_quantus_tie_orders():
    """Ties at the K-th value: ours equals Quantus averaged over every order of the tied pixels."""
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True  # K = 2
    relevance = np.zeros((4, 4))
    relevance[0, 0] = 2.0
    relevance[0, 1] = relevance[2, 2] = relevance[3, 3] = 1.0  # 3 pixels tied for the 2nd place, 1 inside
    rng = np.random.default_rng(0)
    orders = []
    for _ in range(200):  # a tiny jitter picks one tie order; its mean converges to the pro-rata count
        jitter = np.where(relevance == 1.0, rng.random(relevance.shape) * 1e-9, 0.0)
        orders.append(_quantus(quantus.RelevanceRankAccuracy, relevance + jitter, mask))
    assert rank_accuracy(relevance, mask) == pytest.approx((1 + 1 / 3) / 2)
    assert np.mean(orders) == pytest.approx(rank_accuracy(relevance, mask), abs=0.05)
