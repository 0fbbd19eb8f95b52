"""Per-class mean heatmaps and mean region rankings of a run (MRI), as the seed paper reported.

Means are over the subjects of a class (ground truth when known, else predicted) and per heatmap
method; maps are added into a running float64 sum so a run never holds more than one volume per
(class, method). Mean maps keep the methods' own units; the seed compared methods by the L2
distance between mean maps normalised to sum 1, reported here too.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from batch.analyses.common import class_source
from medxplain_contract.layout import RunLayout
from medxplain_models.localisation import normalised_positive, pairwise_l2

_REL = RunLayout("")  # keys relative to the run


class MeanMaps:
    """Running per-(class, method) sums of heatmaps and of region-table values."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self.sums: dict[tuple[int, str], np.ndarray] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.regions: dict[tuple[int, str], dict[int, dict]] = {}
        self.subjects = {c: {"truth": 0, "predicted": 0} for c in range(len(class_names))}

    def add_subject(self, cls: int, source: str) -> None:
        self.subjects[cls][source] += 1

    def add(self, cls: int, method: str, heatmap: np.ndarray, regions: list[dict] | None) -> None:
        key = (cls, method)
        if key in self.sums and self.sums[key].shape != heatmap.shape:
            raise ValueError(f"{method} heatmap of shape {heatmap.shape} is not on the run's grid {self.sums[key].shape}")
        self.sums[key] = self.sums.get(key, 0) + heatmap.astype(np.float64)
        self.counts[key] = self.counts.get(key, 0) + 1
        for row in regions or []:
            acc = self.regions.setdefault(key, {}).setdefault(int(row["index"]), {
                "index": int(row["index"]), "name": row.get("name"), "hemisphere": row.get("hemisphere"),
                "voxels": row.get("voxels"), "sum": 0.0, "per_voxel": 0.0, "subjects": 0})
            acc["sum"] += float(row["sum"])
            acc["per_voxel"] += float(row["per_voxel"])
            acc["subjects"] += 1

    def mean(self, cls: int, method: str) -> np.ndarray:
        return (self.sums[(cls, method)] / self.counts[(cls, method)]).astype(np.float32)

    def region_ranking(self, cls: int, method: str) -> list[dict]:
        """Regions with mean relevance per voxel and mean summed relevance, each ranked (1 = highest)."""
        rows = [{**{k: v for k, v in r.items() if k not in ("sum", "per_voxel")},
                 "mean_per_voxel": r["per_voxel"] / r["subjects"], "mean_sum": r["sum"] / r["subjects"]}
                for r in self.regions.get((cls, method), {}).values()]
        for field in ("mean_per_voxel", "mean_sum"):
            for rank, row in enumerate(sorted(rows, key=lambda r: (-r[field], r["index"])), start=1):
                row[f"rank_{field.removeprefix('mean_')}"] = rank
        rows.sort(key=lambda r: r["rank_per_voxel"])
        return [{**r, "mean_per_voxel": round(r["mean_per_voxel"], 8), "mean_sum": round(r["mean_sum"], 6)} for r in rows]

    def objects(self, affine: np.ndarray, affine_source: str) -> tuple[dict[str, bytes], dict]:
        """mri/mean_<class>_<method>.nii.gz objects and the mri/summary.json content."""
        out: dict[str, bytes] = {}
        classes: dict[str, dict] = {}
        for c, name in enumerate(self.class_names):
            methods = sorted(m for (k, m) in self.sums if k == c)
            entry: dict = {"subjects": sum(self.subjects[c].values()), "class_source": class_source(self.subjects[c]),
                           "class_source_counts": self.subjects[c], "methods": {}}
            for method in methods:
                key = _REL.mri(f"mean_{name}_{method}.nii.gz")
                out[key] = nifti_gz(self.mean(c, method), affine)
                entry["methods"][method] = {"subjects": self.counts[(c, method)], "mean_map": key,
                                            "regions": self.region_ranking(c, method)}
            if len(methods) > 1:
                entry["l2_between_normalised_mean_maps"] = pairwise_l2(
                    {m: normalised_positive(self.mean(c, m)) for m in methods})
            classes[name] = entry
        return out, {"grid_affine": np.asarray(affine).tolist(), "affine_source": affine_source,
                     "mean_map": "voxel-wise mean of the subjects' heatmaps (method's own units) on the model grid",
                     "regions": "mean over subjects of each region's relevance per voxel and summed relevance "
                                "(result.json regions[method]); ranked by both",
                     "l2": "Euclidean distance between mean maps clipped at 0 and scaled to sum 1 (seed paper)",
                     "classes": classes}


def nifti_gz(volume: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(np.asarray(volume, np.float32), np.asarray(affine, np.float64))
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
