"""Incremental 3D occlusion (medxplain_engine/occlusion3d.py) against the straightforward full recomputation.

A small random ClassificationModel3D on the 2 mm grid (97x115x97: the trailing voxels the max-pools
drop are exercised) with random BatchNorm statistics, and a planted model whose output depends on a
single voxel, so the expected map is known without any network.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medxplain_engine.occlusion3d import (
    Occlusion3D,
    Window,
    incremental_drops,
    occluded_windows,
    occlusion_map,
    occlusion_map_reference,
    reference_drops,
    relevance_map,
    window_grid,
)
from medxplain_models.adni import ADNIConfig, ClassificationModel3D, conv_output_shape

SHAPE = (97, 115, 97)
ATOL = 1e-5


def _ellipsoid(centre: tuple[int, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(SHAPE, dtype=np.float32)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def _ball(centre: tuple[int, ...], radius: float) -> np.ndarray:
    return _ellipsoid(centre, (radius,) * 3)


@pytest.fixture(scope="module")
def brain() -> tuple[torch.Tensor, np.ndarray]:
    """A brain-ish mask (ellipsoid) and a normalised volume that is 0 outside it."""
    mask = _ellipsoid((48, 57, 48), (40, 48, 36))
    rng = np.random.default_rng(0)
    volume = np.where(mask, rng.normal(size=SHAPE), 0).astype(np.float32)
    return torch.from_numpy(volume)[None, None], mask


@pytest.fixture(scope="module")
def random_model(brain) -> ClassificationModel3D:
    """Random weights; BatchNorm statistics from the volume (so activations and drops are O(1), not
    vanishing) and random affine parameters, negative scales included (max-pool does not commute)."""
    torch.manual_seed(0)
    model = ClassificationModel3D(ADNIConfig(input_shape=SHAPE)).eval()
    x = brain[0]
    with torch.no_grad():
        for i in range(1, 5):
            y = getattr(model, f"Conv_{i}")(x)
            bn = getattr(model, f"Conv_{i}_bn")
            bn.running_mean.copy_(y.mean(dim=(0, 2, 3, 4)))
            bn.running_var.copy_(y.var(dim=(0, 2, 3, 4)))
            bn.weight.uniform_(0.5, 1.5).mul_(torch.randn_like(bn.weight).sign())
            bn.bias.uniform_(-0.2, 0.2)
            if i < 4:
                x = getattr(model, f"pool_{i}")(model.block(i, x))
    return model


def _border_windows(shape: tuple[int, ...], size: int, stride: int) -> list[Window]:
    """Opposite corners, edge/face mixes and the middle of the grid: clipped and unclipped cubes."""
    grid = dict(window_grid(shape, size, stride))
    last = tuple(len(range(0, n, stride)) - 1 for n in shape)
    picks = [(0, 0, 0), last, (0, last[1], last[2] // 2), (last[0] // 2, last[1] // 2, last[2] // 2),
             (last[0], 0, last[2] // 2), (last[0] // 2, last[1], 0)]
    return [(idx, grid[idx]) for idx in dict.fromkeys(picks)]


@pytest.mark.parametrize(("size", "stride"), [(40, 12), (20, 7), (9, 16), (3, 11), (2, 13), (1, 23)])
def test_incremental_drops_equal_full_recomputation(random_model, brain, size, stride):
    volume, _ = brain
    windows = _border_windows(SHAPE, size, stride)
    fast = incremental_drops(random_model, volume, 1, windows, batch_size=8)  # one batch: mixed clipping
    np.testing.assert_allclose(fast, reference_drops(random_model, volume, 1, windows), rtol=0, atol=ATOL)
    if size > 3:  # the comparison is not vacuous
        assert np.abs(fast).max() > 100 * ATOL


def test_one_window_at_a_time_equals_batched(random_model, brain):
    volume, _ = brain
    windows = _border_windows(SHAPE, 20, 7)
    np.testing.assert_allclose(incremental_drops(random_model, volume, 0, windows, batch_size=1),
                               incremental_drops(random_model, volume, 0, windows, batch_size=8), rtol=0, atol=1e-6)


def test_occlusion_map_equals_reference_map(random_model, brain):
    volume, mask = brain
    fast = occlusion_map(random_model, volume, 1, 30, 40, mask)
    reference = occlusion_map_reference(random_model, volume, 1, 30, 40, mask)
    assert fast.shape == SHAPE
    assert fast.max() > 100 * ATOL
    np.testing.assert_allclose(fast, reference, rtol=0, atol=ATOL)


def test_windows_outside_the_brain_are_skipped_and_zero(random_model, brain):
    volume, _ = brain
    mask = _ball((30, 40, 60), 12)
    masked = np.where(mask, volume[0, 0].numpy(), 0)[None, None]
    volume = torch.from_numpy(masked.astype(np.float32))
    inside = {idx for idx, _ in occluded_windows(SHAPE, 16, 32, mask)}
    outside = [(idx, sl) for idx, sl in window_grid(SHAPE, 16, 32) if idx not in inside]
    assert 0 < len(inside) < len(outside)
    assert not any(mask[sl].any() for _, sl in outside)
    np.testing.assert_allclose(incremental_drops(random_model, volume, 1, outside), 0, atol=1e-6)
    np.testing.assert_allclose(occlusion_map(random_model, volume, 1, 16, 32, mask),
                               occlusion_map(random_model, volume, 1, 16, 32), rtol=0, atol=1e-6)


def _single_voxel_model() -> ClassificationModel3D:
    """Channel 0 passes the input through every block (centre tap 1, identity BN): the AD logit is
    5 x the sum of the last feature map, so p(AD) drops to 1/2 exactly when the input's one bright
    voxel is occluded, and does not move otherwise."""
    model = ClassificationModel3D(ADNIConfig(input_shape=SHAPE)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for i in range(1, 5):
            getattr(model, f"Conv_{i}").weight[0, 0, 1, 1, 1] = 1.0
            getattr(model, f"Conv_{i}_bn").weight.fill_(1.0)
        model.dense_1.weight[0, :int(np.prod(conv_output_shape(SHAPE)))] = 1.0
        model.dense_2.weight[0, 0] = 1.0
        model.dense_3.weight[1, 0] = 5.0
    return model


@torch.inference_mode()
def _p_ad(model: ClassificationModel3D, volume: torch.Tensor) -> float:
    return float(torch.softmax(model(volume), dim=1)[0, 1])


BRIGHT = (43, 61, 41)  # inside exactly one 12-voxel cube of the stride-20 grid


@pytest.fixture(scope="module")
def planted() -> tuple[ClassificationModel3D, torch.Tensor]:
    volume = torch.zeros(1, 1, *SHAPE)
    volume[(0, 0, *BRIGHT)] = 1.0
    return _single_voxel_model(), volume


def test_planted_voxel_is_found_exactly_where_expected(planted):
    model, volume = planted
    base = _p_ad(model, volume)
    assert base > 0.99
    windows = window_grid(SHAPE, 12, 20)
    covers = np.array([all(s.start <= b < s.stop for s, b in zip(sl, BRIGHT)) for _, sl in windows])
    assert covers.sum() == 1
    np.testing.assert_allclose(incremental_drops(model, volume, 1, windows), np.where(covers, base - 0.5, 0),
                               rtol=0, atol=1e-6)


def test_attribute_with_the_seed_defaults(planted):
    model, volume = planted
    mask = _ball(BRIGHT, 6)
    ctx = SimpleNamespace(score_model=SimpleNamespace(model=model), inputs=volume, brain_mask=mask, voxel_mm=1.0)
    relevance = Occlusion3D().attribute(ctx, 1, SimpleNamespace(occlusion_size=None, occlusion_stride=None))
    drop = _p_ad(model, volume) - 0.5
    windows = window_grid(SHAPE, 40, 12)
    expected = [drop if all(s.start <= b < s.stop for s, b in zip(sl, BRIGHT)) else 0.0 for _, sl in windows]
    np.testing.assert_allclose(relevance, relevance_map(SHAPE, 12, windows, np.array(expected)), rtol=0, atol=1e-6)


def test_training_mode_is_refused(random_model, brain):
    random_model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            incremental_drops(random_model, brain[0], 1, _border_windows(SHAPE, 20, 7))
    finally:
        random_model.eval()


@pytest.mark.parametrize(("size", "stride"), [(40, 12), (9, 16), (2, 13)])
def test_tensor_path_equals_full_recomputation(random_model, brain, size, stride):
    """The tensor path a GPU runs (backend="torch"), run on the CPU: same drops as the numpy path and the reference."""
    volume, _ = brain
    windows = _border_windows(SHAPE, size, stride)
    on_tensors = incremental_drops(random_model, volume, 1, windows, batch_size=8, backend="torch")
    np.testing.assert_allclose(on_tensors, reference_drops(random_model, volume, 1, windows), rtol=0, atol=ATOL)
    np.testing.assert_allclose(on_tensors, incremental_drops(random_model, volume, 1, windows, batch_size=8),
                               rtol=0, atol=ATOL)
    if size > 3:
        assert np.abs(on_tensors).max() > 100 * ATOL


def test_unknown_backend_is_refused(random_model, brain):
    volume, _ = brain
    with pytest.raises(ValueError, match="backend"):
        incremental_drops(random_model, volume, 1, _border_windows(SHAPE, 20, 7), backend="cupy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU tensor path is tested above)")
def test_cuda_drops_match_cpu(random_model, brain):
    import copy

    volume, _ = brain
    windows = _border_windows(SHAPE, 20, 7)
    cpu = incremental_drops(random_model, volume, 1, windows, batch_size=8)
    model = copy.deepcopy(random_model).cuda()
    gpu = incremental_drops(model, volume.cuda(), 1, windows, batch_size=8)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3)  # cuDNN's conv algorithms round differently
