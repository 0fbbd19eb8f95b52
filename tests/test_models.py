"""Architecture facts the explanations rely on."""

from __future__ import annotations

import pytest
import torch

from medxplain_models.adni import ADNIConfig, ClassificationModel3D, conv_output_shape
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
