"""Tri-planar (axial / coronal / sagittal) slice viewer for MRI volumes with a heatmap overlay.

Volumes are in voxel order (i, j, k) ~ (x: left-right, y: posterior-anterior, z: inferior-superior)
as NIfTI stores them on the model's template grid; slices are rotated so superior/anterior is up.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from ui.overlay import blend, normalise, to_uint8

PLANES = ("axial", "coronal", "sagittal")
_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def plane(volume: np.ndarray, name: str, index: int) -> np.ndarray:
    """One 2D slice, oriented for display."""
    index = int(np.clip(index, 0, volume.shape[_AXIS[name]] - 1))
    cut = np.take(volume, index, axis=_AXIS[name])
    return np.rot90(cut)


def peak_index(heat: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if heat is None or not np.any(heat):
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))  # type: ignore[return-value]


def viewer(volume: np.ndarray, heat: np.ndarray | None, alpha: float, cmap: str, key: str) -> None:
    """Three slice sliders (starting at the heatmap's peak) and the three overlaid planes.

    ``heat`` must already be on the volume's grid (``ui.geometry.place_3d`` resamples it by the affines).
    """
    if heat is not None and heat.shape != volume.shape:
        raise ValueError(f"heatmap grid {list(heat.shape)} is not the volume's {list(volume.shape)}")
    start = peak_index(heat, volume.shape)
    grey_lo, grey_hi = float(np.percentile(volume, 0.5)), float(np.percentile(volume, 99.5))
    heat_range = (float(np.min(heat)), float(np.max(heat))) if heat is not None else None
    columns = st.columns(3)
    for col, name in zip(columns, PLANES):
        axis = _AXIS[name]
        with col:
            index = st.slider(f"{name} slice", 0, volume.shape[axis] - 1, int(start[axis]), key=f"{key}_{name}")
            grey = to_uint8(plane(volume, name, index), grey_lo, grey_hi)
            overlay = None if heat is None else plane(heat, name, index)
            if overlay is not None and heat_range is not None:
                overlay = normalise(overlay, *heat_range)
            st.image(blend(grey, overlay, alpha, cmap, heat_range=(0.0, 1.0)), caption=f"{name} {index}",
                     width="stretch")
