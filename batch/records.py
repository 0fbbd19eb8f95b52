"""The contract between the batch job's storage side and its run-level analyses.

The job (``batch.runner`` / ``batch.merge``) reads a finished run back from object storage into
:class:`ItemRecord` objects; the analyses (``batch.analyses``) are pure functions of those records
and return the run-level objects as ``{relative key: bytes}``, so they are testable without storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemRecord:
    item_id: str
    result: dict  # items/<id>/result.json; result["item"] = {"id", "case_id", "truth", "mask"} (pseudonyms)
    features: dict[str, np.ndarray]  # items/<id>/features.npz
    # method -> decoded float32 heatmap (2D: the sent image's pixels; 3D: the model's template grid)
    load_heatmap: Callable[[str], np.ndarray] = field(repr=False, default=lambda method: np.zeros(0))
    # ground-truth lesion mask on the same grid as the heatmap, or None when unknown
    load_mask: Callable[[], np.ndarray | None] = field(repr=False, default=lambda: None)

    @property
    def truth(self) -> int | None:
        return self.result.get("item", {}).get("truth")

    @property
    def case_id(self) -> str:
        return self.result.get("item", {}).get("case_id") or self.item_id

    @property
    def predicted(self) -> int:
        return int(self.result["prediction"]["label_index"])


@dataclass
class ModelInfo:
    """What the analyses need to know about the model version of the run."""

    kind: str  # "ddsm" | "adni"
    name: str
    version: str
    class_names: list[str]
    classifier_weight: np.ndarray | None = None  # ddsm: (classes, units) fc weight
    classifier_bias: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # model.json content
    # adni: the template grid's affine (the bundle's mean.nii.gz), for the run's mean maps
    grid_affine: np.ndarray | None = None
