"""Deletion / insertion curves on a model whose evidence is known, with Quantus's PixelFlipping as oracle."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from model_store.faithfulness import CurveScorer, fractions, pixel_order


class RegionScore(nn.Module):
    """Class 0's logit is the input summed with ``weight``; class 1's is 0: the evidence map is ``weight``."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight.astype(np.float32)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x[:, 0] * self.weight).flatten(1).sum(1)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


@pytest.fixture
def case() -> tuple[RegionScore, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = np.zeros((20, 25))
    weight[5:10, 5:15] = rng.uniform(0.05, 0.1, (5, 10))  # distinct values: no ties in the order
    image = rng.uniform(0.5, 1.0, (20, 25))
    image[0, 0] = 0.0  # Quantus's "black" baseline is the input's minimum: make it 0, ours
    return RegionScore(weight).eval(), torch.from_numpy(image.astype(np.float32))[None, None], weight


def test_the_evidence_map_beats_its_reverse_and_random_order(case):
    model, x, weight = case
    scorer = CurveScorer(model, x, target=0, steps=10)
    best = scorer.aucs(weight + 1e-6 * np.random.default_rng(1).random(weight.shape))
    worst = scorer.aucs(-weight)
    rand = scorer.aucs(np.random.default_rng(2).random(weight.shape))
    assert best["deletion_auc"] < rand["deletion_auc"] < worst["deletion_auc"]
    assert best["insertion_auc"] > rand["insertion_auc"] > worst["insertion_auc"]
    for r in (best, worst, rand):
        assert 0.0 <= r["deletion_auc"] <= 1.0 and 0.0 <= r["insertion_auc"] <= 1.0
        assert len(r["deletion_curve"]) == len(r["insertion_curve"]) == 11


def test_curves_share_their_end_points(case):
    model, x, weight = case
    scorer = CurveScorer(model, x, target=0, steps=4)
    with torch.no_grad():
        p_full = torch.softmax(model(x), 1)[0, 0].item()
        p_empty = torch.softmax(model(torch.zeros_like(x)), 1)[0, 0].item()
    for relevance in (weight, np.random.default_rng(3).random(weight.shape)):
        curves = scorer.curves(relevance)
        assert curves["deletion"][0] == pytest.approx(p_full) == curves["insertion"][-1]
        assert curves["deletion"][-1] == pytest.approx(p_empty) == curves["insertion"][0]
    with pytest.raises(ValueError, match="does not match"):
        scorer.curves(weight[:10])


def test_pixels_outside_where_never_change(case):
    model, x, weight = case
    where = np.zeros(weight.shape, bool)
    where[:, :12] = True  # half of the evidence region lies outside
    curves = CurveScorer(model, x, target=0, where=where, steps=5).curves(weight)
    kept = x.clone()
    kept[0, 0][torch.from_numpy(where)] = 0.0
    with torch.no_grad():
        assert curves["deletion"][-1] == pytest.approx(torch.softmax(model(kept), 1)[0, 0].item())
    order = pixel_order(weight, where)
    assert where.ravel()[order].all() and len(order) == where.sum()


def test_pixel_order_is_stable_on_ties():
    relevance = np.array([[1.0, 3.0], [3.0, 0.0]])
    assert pixel_order(relevance).tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deletion_agrees_with_quantus_pixel_flipping(case, seed):
    """Quantus 0.6 PixelFlipping = our deletion curve without its first point (the unchanged input)."""
    model, x, weight = case
    relevance = np.random.default_rng(seed).random(weight.shape) + (seed == 0) * weight  # distinct values
    steps = 10
    ours = CurveScorer(model, x, target=0, steps=steps).curves(relevance)["deletion"]
    theirs = quantus.PixelFlipping(features_in_step=relevance.size // steps, perturb_baseline="black",
                                   disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=np.array([0]), a_batch=relevance[None, None], softmax=True,
        device="cpu", channel_first=True)
    assert relevance.size % steps == 0  # otherwise Quantus's last step would be partial
    np.testing.assert_allclose(ours[1:], np.asarray(theirs[0]), atol=1e-6)
    assert fractions(steps)[-1] == 1.0
