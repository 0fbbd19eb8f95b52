"""Where the engine computes, and in which precision its forward-only path runs.

One place turns a device name ("auto" | "cpu" | "cuda" | "cuda:N") into a ``torch.device``, so
serving, batch and the benches refuse the same bad names with the same message. "auto" is CUDA when
a CUDA device is present, else the CPU; asking for CUDA where there is none is an error rather than a
silent fall-back, because a GPU deployment computing on its CPU is a misconfiguration to see at once.

Mixed precision (``amp``) is torch's autocast: fp16 on CUDA, bf16 on CPU (the dtype each backend's
autocast supports well). The engine applies it only to forward passes of items that ask for no
explanation; explanations always run in fp32.
"""

from __future__ import annotations

import contextlib
import re

import torch

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
_CUDA = re.compile(r"cuda(?::([0-9]{1,2}))?")
FP32 = "fp32"


class DeviceError(ValueError):
    """A device name that is malformed or names hardware this process cannot use."""


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" (or a torch.device) -> a usable torch.device, else DeviceError."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "cpu" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise DeviceError(f"unknown device: use one of {DEVICE_CHOICES}")  # never echo the raw value
    if not torch.cuda.is_available():
        raise DeviceError("CUDA was asked for but no CUDA device is available to this process "
                          "(CPU-only torch build, no driver, or no GPU assigned): use --device cpu or auto")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"cuda:{index} was asked for but this process sees {count} CUDA device(s)")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (tensor cores), bf16 on CPU (CPU autocast's own lower-precision type)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def precision_label(device: torch.device, amp: bool) -> str:
    """What ``model.precision`` of a response says: "fp32", "fp16-autocast" or "bf16-autocast"."""
    if not amp:
        return FP32
    return "fp16-autocast" if autocast_dtype(device) == torch.float16 else "bf16-autocast"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """torch.autocast for the device when enabled, else a no-op (so fp32 code paths stay untouched)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


def describe_device(device: torch.device) -> dict:
    """{"type", "index", "name"} for run metadata and benches (the GPU's product name on CUDA)."""
    if device.type == "cuda":
        index = device.index or 0
        return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index)}
    return {"type": device.type, "index": None, "name": "cpu"}


def parse_bool(value: object, name: str) -> bool:
    """A handler setting given as YAML bool, 0/1 or text (true/false/yes/no)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no", ""):
        return value.strip().lower() in ("1", "true", "yes")
    raise DeviceError(f"{name} must be true or false")
