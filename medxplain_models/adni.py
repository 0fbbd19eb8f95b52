"""The cnn-interpretability seed's ``ClassificationModel3D`` (CN vs AD from a registered T1 MRI).

Parameter names (``Conv_1..4``, ``Conv_1..4_bn``, ``dense_1..3``) are the seed's, so its plain
state dicts load unchanged. The seed reused one ReLU module six times; here every activation has
its own module (the state dict is unaffected) so that hooks -- guided backprop, Grad-CAM, unit
capture -- know which call they see. The flatten size is derived from the input shape, so the
seed's 1 mm grid (193x229x193 -> 64x4x5x4 = 5120) and coarser demo grids use the same class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
from torch import nn

CLASS_NAMES = ("CN", "AD")
SEED_SHAPE = (193, 229, 193)
CHANNELS = (1, 8, 16, 32, 64)
POOL_SIZES = (2, 3, 2, 3)
EXPLAINED_LAYER = "relu_4"  # output of the last conv block, before its max-pool


def conv_output_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Spatial shape after the four conv(k=3, no padding) + max-pool blocks."""
    shape = list(input_shape)
    for pool in POOL_SIZES:
        shape = [(s - 2) // pool for s in shape]
    if min(shape) < 1:
        raise ValueError(f"input shape {input_shape} is too small for four conv/pool blocks")
    return tuple(shape)  # type: ignore[return-value]


def covering_size(extent: int) -> int:
    """Smallest input size >= `extent` whose four conv/pool blocks use every voxel.

    The unpadded convs and floor-rounding max-pools drop trailing voxels: on a 97-voxel axis the
    network never sees the last 19 (38 mm on the 2 mm grid, most of one temporal lobe). A grid of
    size 36 f + 42 (78, 114, 150, 186, 222, ...) is covered exactly.
    """
    output = 1
    while True:
        size = output
        for pool in reversed(POOL_SIZES):
            size = size * pool + 2
        if size >= extent:
            return size
        output += 1


def cell_grid(layer: str) -> tuple[float, float]:
    """Input-voxel position of a block's first cell (its receptive field's centre) and the cell spacing.

    The unpadded 3-convs move each block's first cell one cell in, and each max-pool of p by (p - 1) / 2
    cells, so the cells do not tile the input evenly as interpolation assumes: on a 78-voxel axis
    relu_4's three cells centre at voxels 26.5, 38.5 and 50.5, not 12.5, 38.5 and 64.5. Maps upsampled
    without this put a peak in the middle of the brain up to 14 voxels (28 mm) out toward its edge.
    """
    offset, step = 0.0, 1.0
    for i, pool in enumerate(POOL_SIZES, start=1):
        offset += step  # a 3-wide unpadded conv: output cell j is centred on input cell j + 1
        if layer == f"relu_{i}":
            return offset, step
        offset += (pool - 1) / 2 * step  # a pool of p: centred on the middle of its p inputs
        step *= pool
    raise ValueError(f"no conv block {layer!r}: the blocks are relu_1..relu_{len(POOL_SIZES)}")


@dataclass(frozen=True)
class ADNIConfig:
    input_shape: tuple[int, int, int] = SEED_SHAPE
    dropout: float = 0.8
    dropout2: float = 0.8
    num_classes: int = len(CLASS_NAMES)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ADNIConfig:
        return cls(**{**d, "input_shape": tuple(d["input_shape"])})


class ClassificationModel3D(nn.Module):
    def __init__(self, config: ADNIConfig = ADNIConfig()) -> None:
        super().__init__()
        self.config = config
        for i, (c_in, c_out) in enumerate(pairwise(CHANNELS), start=1):
            setattr(self, f"Conv_{i}", nn.Conv3d(c_in, c_out, 3))
            setattr(self, f"Conv_{i}_bn", nn.BatchNorm3d(c_out))
            setattr(self, f"relu_{i}", nn.ReLU())
            setattr(self, f"pool_{i}", nn.MaxPool3d(POOL_SIZES[i - 1]))
        conv_shape = conv_output_shape(config.input_shape)
        self.flatten_size = CHANNELS[-1] * conv_shape[0] * conv_shape[1] * conv_shape[2]
        self.dropout = nn.Dropout(config.dropout)
        self.dense_1 = nn.Linear(self.flatten_size, 128)
        self.relu_d1 = nn.ReLU()
        self.dropout2 = nn.Dropout(config.dropout2)
        self.dense_2 = nn.Linear(128, 64)
        self.relu_d2 = nn.ReLU()
        self.dense_3 = nn.Linear(64, config.num_classes)

    @property
    def num_units(self) -> int:
        return CHANNELS[-1]

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Conv -> BN -> ReLU of block i (no pooling)."""
        conv, bn, relu = getattr(self, f"Conv_{i}"), getattr(self, f"Conv_{i}_bn"), getattr(self, f"relu_{i}")
        return relu(bn(conv(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last conv block (N, 64, d, h, w), before its pool."""
        for i in range(1, 4):
            x = getattr(self, f"pool_{i}")(self.block(i, x))
        return self.block(4, x)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.pool_4(fmap).flatten(1)
        x = self.relu_d1(self.dense_1(self.dropout(x)))
        x = self.relu_d2(self.dense_2(self.dropout2(x)))
        return self.dense_3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
