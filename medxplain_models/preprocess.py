"""Input normalisation shared by training, the serving engine and the batch job.

Kept in one place so that a patch seen in training and the same patch sent to TorchServe become
the same tensor.
"""

from __future__ import annotations

import torch

from medxplain_models.ddsm import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def ddsm_normalise(grey: torch.Tensor) -> torch.Tensor:
    """(N, H, W) grey values in [0, 1] -> (N, 3, H, W): grey copied to 3 channels, ImageNet mean/std.

    DeepMiner started from ImageNet weights; the normalisation stays so its checkpoints load as is.
    """
    mean, std = _MEAN.to(grey.device), _STD.to(grey.device)  # no-op on the CPU
    return (grey.float().unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
