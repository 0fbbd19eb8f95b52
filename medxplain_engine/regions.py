"""Relevance per atlas region, as the MRI seed paper reported it."""

from __future__ import annotations

import numpy as np


def region_relevance(relevance: np.ndarray, labels: np.ndarray, regions: list) -> list[dict]:
    """Per region: summed relevance, relevance per voxel, voxel count and rank (1 = largest sum)."""
    flat_labels = labels.ravel().astype(np.int64)
    size = int(flat_labels.max()) + 1
    sums = np.bincount(flat_labels, weights=relevance.ravel().astype(np.float64), minlength=size)
    counts = np.bincount(flat_labels, minlength=size)
    rows = [{"index": r.index, "name": r.name, "hemisphere": r.hemisphere, "voxels": int(counts[r.index]),
             "sum": float(sums[r.index]), "per_voxel": float(sums[r.index] / counts[r.index])}
            for r in regions if r.index < size and counts[r.index] > 0]
    rows.sort(key=lambda row: -row["sum"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows
