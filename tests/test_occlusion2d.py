"""Incremental 2D occlusion (medxplain_engine/occlusion2d.py) against Captum's Occlusion, the engine's former map.

Small random DDSM ResNets (BasicBlock: depth 18, Bottleneck: depth 50) with BatchNorm statistics
from the input (so activations are O(1), not vanishing or exploding) and random affine parameters,
on a non-square, odd-size image: windows truncated at the border, zero padding at every map edge.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medxplain_engine.mammo import FullImageScore, PatchScore
from medxplain_engine.occlusion2d import (
    incremental_drops,
    occlusion_map,
    occlusion_map_reference,
    relevance_map,
    window_boxes,
)
from medxplain_models.ddsm import DDSMConfig, DDSMResNet
from medxplain_models.preprocess import ddsm_normalise

# Float32 rounding only: crops run other conv kernels than the full map. Random nets give logits of
# O(1..1000), so the tolerance is relative to the largest score drop of the reference map.
RTOL = 1e-5


def _assert_same_map(got: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 1e-3, "degenerate test: occlusion changes nothing"
    np.testing.assert_allclose(got, expected, rtol=0, atol=RTOL * scale)


def _model(depth: int, grey: torch.Tensor) -> DDSMResNet:
    torch.manual_seed(depth)
    model = DDSMResNet(DDSMConfig(depth=depth))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative statistics of the calibration pass
    model.train()
    with torch.no_grad():
        model(ddsm_normalise(grey[:, 0]))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5).mul_(torch.randn_like(module.weight).sign())
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _grey(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A smooth blob on noise: the score depends on where the blob is."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    blob = np.exp(-((rows - shape[0] * 0.4) ** 2 + (cols - shape[1] * 0.6) ** 2) / (2 * (min(shape) / 6) ** 2))
    return torch.from_numpy((0.3 + 0.5 * blob + 0.1 * rng.random(shape)).astype(np.float32))[None, None]


@pytest.mark.parametrize(("depth", "shape", "size", "stride"), [
    (18, (97, 131), 24, 11),   # odd, non-square; last windows truncated on both axes
    (18, (75, 75), 16, 16),    # square, stride = size
    (50, (67, 89), 20, 9),     # Bottleneck blocks with downsampling shortcuts
])
def test_incremental_map_equals_captum_occlusion(depth, shape, size, stride):
    grey = _grey(shape)
    model = _model(depth, grey)
    score = FullImageScore(model)
    with torch.no_grad():
        target = int(score(grey).argmax())
    expected = occlusion_map_reference(score, grey, target, size, stride)
    got = occlusion_map(model, score.head, ddsm_normalise, grey, target, size, stride, batch_size=5)
    assert got.shape == expected.shape == shape
    _assert_same_map(got, expected)


def test_patch_score_uses_the_pooled_head():
    grey = _grey((80, 80), seed=1)
    model = _model(18, grey)
    score = PatchScore(model)
    expected = occlusion_map_reference(score, grey, 1, 20, 10)
    got = occlusion_map(model, score.head, ddsm_normalise, grey, 1, 20, 10)
    _assert_same_map(got, expected)


def test_a_wrong_window_fill_is_detected():
    """The comparison can fail: occluding with another value than Captum's baseline gives other drops."""
    grey = _grey((64, 72))
    model = _model(18, grey)
    score = FullImageScore(model)
    lo, hi = window_boxes((64, 72), 16, 8)
    right = incremental_drops(model, score.head, ddsm_normalise(grey[:, 0]), 0, lo, hi,
                              ddsm_normalise(torch.zeros(1, 1, 1))[0, :, 0, 0])
    wrong = incremental_drops(model, score.head, ddsm_normalise(grey[:, 0]), 0, lo, hi,
                              ddsm_normalise(torch.full((1, 1, 1), 0.5))[0, :, 0, 0])
    expected = occlusion_map_reference(score, grey, 0, 16, 8)
    _assert_same_map(relevance_map((64, 72), lo, hi, right), expected)
    assert np.abs(relevance_map((64, 72), lo, hi, wrong) - expected).max() > 100 * RTOL * np.abs(expected).max()


def test_windows_follow_captum_and_cover_every_pixel():
    lo, hi = window_boxes((10, 11), 4, 3)
    assert lo[:, 0].tolist() == [0] * 4 + [3] * 4 + [6] * 4 and lo[:4, 1].tolist() == [0, 3, 6, 9]
    assert hi.max(axis=0).tolist() == [10, 11]
    covered = np.zeros((10, 11), bool)
    for (r0, c0), (r1, c1) in zip(lo, hi):
        covered[r0:r1, c0:c1] = True
    assert covered.all()
