"""Place a map on the image shown, from the geometry the response records (never by assuming frames match).

2D: heatmaps and unit maps are in the *sent* frame (``input.geometry.size``); the batch's
``input.png`` is the analysed input, in the ``analysed_size`` frame. A map is resized from the
one recorded frame into the other, and refused if it is not in the frame the response says.
3D: maps and volumes are NIfTI images with their own affines; a map is resampled onto the shown
volume's grid by those affines (nibabel), and there is no identity fallback: without an affine
nothing is placed.

Responses made before ``input.geometry`` existed are read from the fields they do carry
(``input.height/width/analysed_size``, ``input.affine``), never from a guess.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from ui.overlay import DecodeError, resize


class GeometryError(DecodeError):
    """A map cannot be placed on the shown image: its frame is unknown or not the recorded one."""


def frames_2d(input_meta: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(sent size, analysed size) as (height, width), from ``input.geometry`` or today's fields."""
    geometry = input_meta.get("geometry") or {}
    if geometry.get("size"):
        sent = tuple(int(v) for v in geometry["size"])
        analysed = tuple(int(v) for v in geometry.get("analysed_size") or sent)
        return sent, analysed  # type: ignore[return-value]
    if "height" not in input_meta or "width" not in input_meta:
        raise GeometryError("the result records no image size, so its maps cannot be placed")
    sent = (int(input_meta["height"]), int(input_meta["width"]))
    analysed = tuple(int(v) for v in input_meta.get("analysed_size") or sent)  # patch mode: analysed as sent
    return sent, analysed  # type: ignore[return-value]


def place_2d(values: np.ndarray, input_meta: dict, frame: str, shown_shape: tuple[int, ...]) -> np.ndarray:
    """A sent-frame map resized into ``frame`` ("sent" or "analysed"), which must be the shown image's size."""
    sent, analysed = frames_2d(input_meta)
    if tuple(values.shape) != sent:
        raise GeometryError(f"a map of {list(values.shape)} is not in the recorded sent frame {list(sent)}")
    target = sent if frame == "sent" else analysed
    if tuple(shown_shape[:2]) != target:
        raise GeometryError(f"the shown image ({list(shown_shape[:2])}) is not the recorded {frame} frame "
                            f"({list(target)})")
    return resize(values, target)


def volume_affine(input_meta: dict) -> np.ndarray:
    """The sent grid's affine: ``input.geometry.affine`` or ``input.affine``; refuses when neither exists."""
    geometry = input_meta.get("geometry") or {}
    affine = geometry.get("affine") or input_meta.get("affine")
    if affine is None:
        raise GeometryError("the result records no affine for its volume, so its maps cannot be placed")
    return np.asarray(affine, np.float64)


def place_3d(heat: nib.Nifti1Image, shown_shape: tuple[int, ...], shown_affine: np.ndarray) -> np.ndarray:
    """A map (NIfTI, its own affine) resampled onto the shown volume's grid (linear, zero outside)."""
    shape = tuple(int(s) for s in shown_shape[:3])
    shown_affine = np.asarray(shown_affine, np.float64)
    data = np.asarray(heat.get_fdata(), np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        heat = nib.Nifti1Image(data, heat.affine)
    if data.shape == shape and np.allclose(heat.affine, shown_affine, atol=1e-4):
        return data
    placed = resample_from_to(nib.Nifti1Image(data, heat.affine), (shape, shown_affine), order=1, cval=0.0)
    return np.asarray(placed.dataobj, np.float32)
