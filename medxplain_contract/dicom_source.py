"""What a DICOM input leaves behind for DICOM outputs: its headers (no pixel data) and the image as seen.

Derived objects (SR, Parametric Map, Secondary Capture: ``medxplain_dicom``) must attach to the source
study and share its frame of reference, so the decoded input keeps the source headers next to its
pixels. They hold patient identity: this object is never serialised into JSON responses, logs or
object keys; only ``medxplain_dicom`` reads it, to copy identity into the derived objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset


@dataclass
class DicomSource:
    """The source headers, one per frame of the sent grid, in that grid's order, and the image as seen.

    - mammogram: ``datasets == [ds]``; ``display`` is (rows, cols) float32 in [0, 1] (LUTs applied).
    - MRI series: one dataset per slice, ``datasets[k]`` is slice ``k`` of the assembled volume
      (``Volume.data[:, :, k]``); ``display`` is that volume (i, j, k) float32 as decoded.
    """

    datasets: list[Dataset]
    display: np.ndarray

    def __post_init__(self) -> None:
        for ds in self.datasets:  # headers only: pixel data would double the memory a request holds
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    del ds[keyword]

    @property
    def is_volume(self) -> bool:
        return self.display.ndim == 3

    def to_frames(self, grid: np.ndarray) -> np.ndarray:
        """A map on the sent grid -> (frames, rows, cols), frame ``f`` aligned with ``datasets[f]``'s pixels.

        2D: (rows, cols) -> (1, rows, cols). 3D: the sent volume's (i, j, k) -> slice k transposed, since
        the assembled volume indexes (column, row, slice) as NIfTI does.
        """
        if grid.ndim == 2:
            return grid[None]
        if grid.shape[2] != len(self.datasets):
            raise ValueError("the map has another number of slices than the source series")
        return np.ascontiguousarray(np.transpose(grid, (2, 1, 0)))
