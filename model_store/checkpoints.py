"""Import the seeds' checkpoint formats, so users can bring the weights they already trained.

- DeepMiner saves ``.pth.tar`` dicts ``{"epoch", "state_dict", "optimizer", ...}`` whose keys carry
  the ``module.`` prefix of ``nn.DataParallel``.
- cnn-interpretability saves a plain state dict of ``ClassificationModel3D``.

Checkpoints are read with ``weights_only=True`` (torch's safe unpickler): a checkpoint that holds
arbitrary pickled objects is refused with a clear message instead of being executed.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from medxplain_models.adni import ADNIConfig, ClassificationModel3D
from medxplain_models.ddsm import DDSMConfig, DDSMResNet


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into one of our models."""


def read_checkpoint(path: Path) -> Mapping[str, object]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds pickled objects other than tensors and plain containers; "
            "re-save it as a state dict (refusing to unpickle untrusted code)") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def extract_state_dict(obj: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a training checkpoint with a ``state_dict`` entry."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("no state dict of tensors found (expected a 'state_dict' entry or a bare state dict)")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    return key.removeprefix("module.")


def infer_resnet_depth(state: Mapping[str, torch.Tensor]) -> int:
    """Block counts per stage identify the torchvision ResNet depth."""
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(".conv3." in k for k in state)
    table = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
             (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
    try:
        return table[(*blocks, bottleneck)]
    except KeyError:
        raise CheckpointError(f"unrecognised ResNet layout (blocks per stage {blocks})") from None


def load_ddsm(state: Mapping[str, torch.Tensor], pooling: str = "max") -> DDSMResNet:
    state = {_strip_prefix(k): v for k, v in state.items()}
    config = DDSMConfig(depth=infer_resnet_depth(state), pooling=pooling,  # type: ignore[arg-type]
                        num_classes=int(state["fc.weight"].shape[0]))
    model = DDSMResNet(config)
    _load_strict(model, state)
    return model.eval()


def load_adni(state: Mapping[str, torch.Tensor], input_shape: tuple[int, int, int] | None = None) -> ClassificationModel3D:
    state = {_strip_prefix(k): v for k, v in state.items()}
    config = ADNIConfig(input_shape=input_shape) if input_shape else ADNIConfig()
    model = ClassificationModel3D(config)
    expected, found = model.dense_1.in_features, int(state["dense_1.weight"].shape[1])
    if expected != found:
        raise CheckpointError(
            f"dense_1 expects {found} inputs but input shape {config.input_shape} gives {expected}; "
            "pass the input grid the model was trained on")
    _load_strict(model, state)
    return model.eval()


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"state dict does not match {type(model).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")


def import_checkpoint(path: Path, kind: str, *, pooling: str = "max",
                      input_shape: tuple[int, int, int] | None = None) -> torch.nn.Module:
    """Read a seed checkpoint file and build the matching model."""
    state = extract_state_dict(read_checkpoint(path))
    if kind == "ddsm":
        return load_ddsm(state, pooling=pooling)
    if kind == "adni":
        return load_adni(state, input_shape=input_shape)
    raise CheckpointError(f"unknown model kind {kind!r} (expected 'ddsm' or 'adni')")
