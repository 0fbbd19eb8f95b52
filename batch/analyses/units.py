"""DeepMiner's unit analysis over a run (mammography): the unit atlas and per-class unit rankings.

Atlas: every unit's top-N activating images by raw activation (the spatial maximum, features
"pooled"), each with the 227 px patch box around the peak in the pixels of the item's input.png
and the unit's 7x7 map window there; this is what experts annotate. Rankings: per class,
contribution = activation x classifier weight of that class (exactly the unit's share of the
logit under max pooling); units ranked by how often they are among an image's top-8 contributors
(DeepMiner) and by mean contribution, over the images of that class.
"""

from __future__ import annotations

import numpy as np

from batch.analyses.common import class_source, dumps, group_class
from batch.records import ItemRecord, ModelInfo
from medxplain_contract.layout import RunLayout
from medxplain_models.ddsm import PATCH_SIZE

_REL = RunLayout("")  # keys relative to the run

TOP_CONTRIBUTORS = 8  # DeepMiner counted each image's top-8 units per class
SHORTLIST = 20  # ... and showed experts the 20 most frequent units per class


def patch_box(peak: np.ndarray, cell_size: np.ndarray, map_shape: np.ndarray, size: int = PATCH_SIZE) -> list[int]:
    """[y0, x0, y1, x1] of a size-px box centred on the peak cell's centre, clipped to the image."""
    image = np.round(np.asarray(map_shape, float) * np.asarray(cell_size, float))
    centre = (np.asarray(peak, float) + 0.5) * np.asarray(cell_size, float)
    start = np.floor(centre - size / 2 + 0.5)
    lo, hi = np.clip(start, 0, image), np.clip(start + size, 0, image)
    return [int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])]


def pooled_matrix(records: list[ItemRecord]) -> np.ndarray:
    return np.stack([np.asarray(r.features["pooled"], np.float32).ravel() for r in records])


def unit_atlas(records: list[ItemRecord], pooled: np.ndarray, top_n: int) -> dict[str, bytes]:
    """units/<unit:04d>.json for every unit: its top-N items by activation, highest first."""
    n_items, n_units = pooled.shape
    n = min(top_n, n_items)
    rows = np.argpartition(-pooled, n - 1, axis=0)[:n] if n else np.zeros((0, n_units), int)
    out: dict[str, bytes] = {}
    for unit in range(n_units):
        chosen = rows[:, unit][np.argsort(-pooled[rows[:, unit], unit], kind="stable")]
        entries = []
        for r in chosen:
            feats = records[r].features
            entry = {"item_id": records[r].item_id, "case_id": records[r].case_id,
                     "activation": round(float(pooled[r, unit]), 6),
                     "peak": [int(v) for v in feats["peak"][unit]],
                     "box": patch_box(feats["peak"][unit], feats["cell_size"], feats["map_shape"])}
            if feats.get("peak_maps") is not None:
                entry["map"] = np.round(np.asarray(feats["peak_maps"][unit], np.float32), 4).tolist()
            entries.append(entry)
        out[_REL.unit(unit)] = dumps({
            "unit": unit, "ranked_by": "activation (spatial maximum of the unit's map)",
            "box": f"[y0, x0, y1, x1] in the pixels of items/<item_id>/input.png, {PATCH_SIZE} px centred "
                   "on the peak cell, clipped to the image",
            "map": "the unit's feature map in a window of cells centred on the peak (zero outside the map)",
            "map_scale": entries[0]["activation"] if entries else 0.0,
            "patches": entries})
    return out


def unit_rankings(records: list[ItemRecord], pooled: np.ndarray, model: ModelInfo,
                  top: int = TOP_CONTRIBUTORS) -> dict:
    """units/rankings.json: per class, top-8 frequency and mean contribution over that class's images."""
    weight = np.asarray(model.classifier_weight, np.float32)
    groups = [group_class(r, model) for r in records]
    classes = {}
    for c, name in enumerate(model.class_names):
        members = [i for i, (g, _) in enumerate(groups) if g == c]
        sources = {"truth": sum(groups[i][1] == "truth" for i in members),
                   "predicted": sum(groups[i][1] == "predicted" for i in members)}
        contribution = pooled[members] * weight[c][None, :]
        counts = np.zeros(pooled.shape[1], np.int64)
        if members:
            k = min(top, pooled.shape[1])
            np.add.at(counts, np.argpartition(-contribution, k - 1, axis=1)[:, :k].ravel(), 1)
        mean = contribution.mean(axis=0) if members else np.zeros(pooled.shape[1])
        by_count = sorted(np.flatnonzero(counts), key=lambda u: (-counts[u], -mean[u], u))
        by_mean = np.argsort(-mean, kind="stable")
        classes[name] = {
            "images": len(members), "class_source": class_source(sources), "class_source_counts": sources,
            "top8_frequency": [{"unit": int(u), "count": int(counts[u]), "share": round(counts[u] / len(members), 6),
                                "mean_contribution": round(float(mean[u]), 6)} for u in by_count],
            "mean_contribution": [{"unit": int(u), "mean_contribution": round(float(mean[u]), 6),
                                   "top8_count": int(counts[u])} for u in by_mean]}
    return {"contribution": "pooled activation x classifier weight of the class",
            "top": top, "shortlist_size": SHORTLIST,
            # DeepMiner gave experts the 20 most frequent top-8 units of each class
            "shortlist": sorted({e["unit"] for c in classes.values() for e in c["top8_frequency"][:SHORTLIST]}),
            "class_source": class_source({
                "truth": sum(s == "truth" for _, s in groups), "predicted": sum(s == "predicted" for _, s in groups)}),
            "classes": classes}


def build_units(records: list[ItemRecord], model: ModelInfo, top_n: int) -> tuple[dict[str, bytes], dict]:
    """All units/ objects and a summary of what was built."""
    if not records:
        return {}, {"skipped": "no items"}
    missing = [r.item_id for r in records if not {"pooled", "peak", "map_shape", "cell_size"} <= set(r.features)]
    if missing:
        return {}, {"skipped": f"{len(missing)} items without pooled/peak features, e.g. {missing[0]}"}
    pooled = pooled_matrix(records)
    out = unit_atlas(records, pooled, top_n)
    summary: dict = {"units": pooled.shape[1], "atlas_top_n": min(top_n, len(records))}
    if model.classifier_weight is None:
        summary["rankings"] = "skipped: ModelInfo.classifier_weight missing"
    else:
        rankings = unit_rankings(records, pooled, model)
        out[_REL.units("rankings.json")] = dumps(rankings)
        summary["rankings_class_source"] = rankings["class_source"]
    return out, summary
