"""DeepMiner's mammography patch classifier: a torchvision ResNet with a 3-class head.

The seed replaced global average pooling by global max pooling so that, for every unit u of
``layer4``, ``spatial_max(u) * fc.weight[c, u]`` is exactly u's share of the class-c logit.
Both poolings are kept selectable; the explanation code reads :attr:`DDSMResNet.pooling` to know
whether contributions are exact or a heuristic.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision import models

CLASS_NAMES = ("normal", "benign", "malignant")
PATCH_SIZE = 227
FULL_IMAGE_SHORT_SIDE = 4 * PATCH_SIZE  # a tile is 1/4 of the shorter side, so 908 px keeps the patch scale
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPLAINED_LAYER = "layer4"

Pooling = Literal["max", "avg"]
_RESNETS = {18: models.resnet18, 34: models.resnet34, 50: models.resnet50, 101: models.resnet101, 152: models.resnet152}


@dataclass(frozen=True)
class DDSMConfig:
    """Everything needed to rebuild the network before loading a state dict."""

    depth: int = 152
    pooling: Pooling = "max"
    num_classes: int = len(CLASS_NAMES)

    def to_dict(self) -> dict:
        return asdict(self)


class DDSMResNet(nn.Module):
    """ResNet whose parameter names match torchvision's (and so the seed's checkpoints)."""

    def __init__(self, config: DDSMConfig = DDSMConfig()) -> None:
        super().__init__()
        if config.depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {config.depth}")
        self.config = config
        backbone = _RESNETS[config.depth](weights=None)  # no downloads: users bring their weights
        self.conv1, self.bn1, self.relu, self.maxpool = backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
        self.fc = nn.Linear(backbone.fc.in_features, config.num_classes)

    @property
    def pooling(self) -> Pooling:
        return self.config.pooling

    @property
    def num_units(self) -> int:
        return self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` map (N, units, h, w): the layer DeepMiner explains."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.amax(dim=(2, 3)) if self.config.pooling == "max" else fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))

    def class_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """fc applied as a 1x1 convolution: per-position class logits (N, classes, h, w).

        DeepMiner's full-image analysis: one pass over a whole mammogram gives a class-probability
        map instead of tiling it into patches.
        """
        return F.conv2d(fmap, self.fc.weight[:, :, None, None], self.fc.bias)

    def full_image_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over classes at every position of the class map."""
        return torch.softmax(self.class_map(self.features(x)), dim=1)


@dataclass(frozen=True)
class SpeedSettings:
    """CPU speed-ups of the forward pass (``handler:`` keys; defaults: eager, as trained)."""

    channels_last: bool = False
    fused_forward: bool = False
    warm_up: bool = False

    @classmethod
    def from_dict(cls, settings: dict) -> SpeedSettings:
        return cls(**{f.name: bool(settings.get(f.name, f.default)) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)


class _Trunk(nn.Module):
    def __init__(self, model: DDSMResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def fused_trunk(model: DDSMResNet, channels_last: bool = False) -> nn.Module:
    """``model.features`` with every BatchNorm folded into its conv (torch.fx), for inference only.

    A copy: the explained model keeps its BatchNorm modules (hooks, gradients). Folding changes
    float32 rounding only (about 1e-6 relative).
    """
    trunk = fuse(_Trunk(copy.deepcopy(model)).eval())
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.to(memory_format=torch.channels_last) if channels_last else trunk
