"""Architecture facts the explanations rely on."""

from __future__ import annotations

import pytest
import torch

from medxplain_engine.attribution import upsample
from medxplain_models.adni import ADNIConfig, ClassificationModel3D, cell_grid, conv_output_shape
from medxplain_models.ddsm import DDSMConfig, DDSMResNet


def test_max_pooling_makes_contributions_exact():
    """With global max pooling, sum_u max(u) * w[c, u] + b[c] is exactly the class-c logit."""
    torch.manual_seed(0)
    model = DDSMResNet(DDSMConfig(depth=18, pooling="max")).eval()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        fmap = model.features(x)
        contributions = fmap.amax(dim=(2, 3))[:, None, :] * model.fc.weight[None]  # (N, classes, units)
        assert torch.allclose(contributions.sum(-1) + model.fc.bias, model(x), atol=1e-4)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_class_map_is_the_classifier_at_every_position(pooling):
    """The 1x1-convolution view of fc pooled like the model gives back the model's logits (avg)."""
    torch.manual_seed(0)
    model = DDSMResNet(DDSMConfig(depth=18, pooling=pooling)).eval()
    x = torch.randn(1, 3, 454, 454)
    with torch.no_grad():
        fmap = model.features(x)
        cmap = model.class_map(fmap)
        assert cmap.shape == (1, 3, *fmap.shape[2:])
        at = model.fc(fmap[:, :, 3, 5])
        assert torch.allclose(cmap[:, :, 3, 5], at, atol=1e-4)
        probs = model.full_image_probabilities(x)
        assert torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-5)


def test_patch_maps_to_a_single_position():
    model = DDSMResNet(DDSMConfig(depth=18)).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 227, 227)).shape == (1, 512, 8, 8)


def test_seed_geometry_and_parameter_names():
    model = ClassificationModel3D()
    assert conv_output_shape((193, 229, 193)) == (4, 5, 4)
    assert model.flatten_size == 5120
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {f"Conv_{i}" for i in range(1, 5)} | {f"Conv_{i}_bn" for i in range(1, 5)} | {"dense_1", "dense_2", "dense_3"}
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 6 and len({id(r) for r in relus}) == 6


def test_demo_geometry_derives_flatten_size():
    model = ClassificationModel3D(ADNIConfig(input_shape=(97, 115, 97))).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 97, 115, 97)).shape == (2, 2)


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="too small"):
        ClassificationModel3D(ADNIConfig(input_shape=(40, 40, 40)))


def _receptive_field_centres(layer: str, cells: int) -> list[list[float]]:
    """Per axis, the centre of the input voxels each of the first `cells` cells of `layer` reads."""
    model = ClassificationModel3D(ADNIConfig(input_shape=(78, 115, 78))).eval()
    seen = {}
    getattr(model, layer).register_forward_hook(lambda module, args, out: seen.setdefault("out", out))
    x = torch.randn(1, 1, 78, 115, 78, requires_grad=True)
    model(x)
    centres = []
    for j in range(cells):
        (grad,) = torch.autograd.grad(seen["out"][0, :, j, j, j].sum(), x, retain_graph=True)
        reach = grad[0, 0].abs()
        axes = [reach.sum(dim=tuple(d for d in range(3) if d != axis)).nonzero().flatten() for axis in range(3)]
        centres.append([(a.min().item() + a.max().item()) / 2 for a in axes])
    return centres


@pytest.mark.parametrize("layer", ["relu_1", "relu_2", "relu_3", "relu_4"])
def test_cell_grid_is_where_each_cell_reads_the_input(layer):
    """The unpadded convs and pools shift the cells; upsampled maps rely on cell_grid knowing by how much."""
    offset, step = cell_grid(layer)
    for j, centre in enumerate(_receptive_field_centres(layer, cells=2)):
        assert centre == [offset + j * step] * 3


def test_upsample_on_a_cell_grid_peaks_at_the_cells_centre():
    """relu_4's first cell on a 78-voxel axis reads voxels 0..53: its peak belongs at 26.5, not 12.5."""
    offset, step = cell_grid("relu_4")
    fmap = torch.zeros(1, 3, 6, 3)
    fmap[0, 1, 1, 1] = 1.0
    even = upsample(fmap, (78, 115, 78))[0]
    placed = upsample(fmap, (78, 115, 78), (offset, step))[0]
    assert placed.shape == even.shape == (78, 115, 78)
    assert offset + step == 38.5  # cell 1's centre, halfway between voxels 38 and 39
    near = (1 - 0.5 / step) ** 3
    assert placed[38, 38, 38] == pytest.approx(near) and placed[39, 39, 39] == pytest.approx(near)
    assert placed.max() == pytest.approx(near)
    first = torch.zeros(1, 3, 6, 3)
    first[0, 0, 0, 0] = 1.0
    peak = upsample(first, (78, 115, 78), (offset, step))[0]
    assert peak[:27, :27, :27].min() == pytest.approx(1.0)  # constant out to the first centre
    assert peak[40, 0, 0] == 0.0  # and gone one cell on
    assert upsample(first, (78, 115, 78))[0][26, 26, 26] < 0.5  # even tiling already fades it by voxel 26
