"""Localisation metrics of a relevance map against a ground-truth mask, and map comparisons (numpy only).

Shared by the explanation-quality evaluation (``model_store.evaluate``) and the batch run's quality
report (``batch.analyses.quality``), so both score maps with the same code. Definitions:
``docs/explanation-quality.md``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

DDSM_TOLERANCE_PX = 15
MRI_TOLERANCE_VOXELS = 2


def dilate(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Mask grown by ``tolerance`` pixels/voxels (Euclidean), the pointing game's allowed miss."""
    if tolerance <= 0:
        return mask.astype(bool)
    return ndimage.distance_transform_edt(~mask.astype(bool)) <= tolerance


def pointing_game(relevance: np.ndarray, mask: np.ndarray, tolerance: float = 0) -> float:
    """1 if the map's maximum lies in the (dilated) mask; tied maxima score the fraction that do."""
    peak = relevance == relevance.max()
    return float(dilate(mask, tolerance)[peak].mean())


def mass_accuracy(relevance: np.ndarray, mask: np.ndarray) -> float:
    """Positive relevance inside the mask / all positive relevance (0 without positive relevance)."""
    positive = np.clip(relevance, 0, None)
    total = float(positive.sum())
    return float(positive[mask.astype(bool)].sum()) / total if total > 0 else 0.0


def rank_accuracy(relevance: np.ndarray, mask: np.ndarray) -> float:
    """Share of the K = |mask| most relevant pixels inside the mask; ties at the cut count pro rata."""
    flat, inside = relevance.ravel(), mask.ravel().astype(bool)
    k = int(inside.sum())
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    above, tied = flat > kth, flat == kth
    hits = inside[above].sum() + (k - above.sum()) * inside[tied].mean()
    return float(hits / k)


def spearman(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps (over ``where``); 0 if either map is constant there."""
    a, b = (a, b) if where is None else (a[where], b[where])
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(rankdata(a.ravel()), rankdata(b.ravel()))[0, 1])


def normalised_positive(relevance: np.ndarray) -> np.ndarray:
    """Map clipped at 0 and scaled to sum 1, so every subject weighs the same in a mean map."""
    positive = np.clip(relevance, 0, None).astype(np.float64)
    total = positive.sum()
    return positive / total if total > 0 else positive


def pairwise_l2(maps: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Euclidean distance between every two maps (the seed paper compared mean maps this way)."""
    return {a: {b: float(np.linalg.norm(maps[a] - maps[b])) for b in maps} for a in maps}
