"""DeepMiner's unit analysis over a run (mammography): the unit atlas and per-class unit rankings.

Atlas: every unit's top-N activating images by raw activation (the spatial maximum, features
"pooled"), each with the 227 px patch box around the peak in the pixels of the item's input.png
and the unit's 7x7 map window there; this is what experts annotate. Rankings: per class,
contribution = activation x classifier weight of that class (exactly the unit's share of the
logit under max pooling); units ranked by how often they are among an image's top-8 contributors
(DeepMiner) and by mean contribution, over the images of that class.

Both are built while the merge streams over the items: the atlas keeps, per unit, only its current
top-N candidates (merged with each chunk of new items by (activation desc, item order asc)); the
rankings keep per-class counts and float64 sums. Memory is O(top-N x units), not O(items).
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


FIELDS = {"pooled", "peak", "map_shape", "cell_size"}
CHUNK = 64  # items merged into the atlas at a time


class UnitAtlas:
    """Running per-unit top-N items by pooled activation; ties go to the earlier item."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self.vals: np.ndarray | None = None  # (m, units) float32, best first
        self.rows: np.ndarray | None = None  # (m, units) item rows
        self.peaks: np.ndarray | None = None  # (m, units, 2)
        self.maps: np.ndarray | None = None  # (m, units, h, w) float32, zeros where an item has none
        self.items: dict[int, tuple] = {}  # row -> (item_id, case_id, cell_size, map_shape, has_map)
        self._pending: list[tuple[int, ItemRecord]] = []

    def add(self, row: int, record: ItemRecord) -> None:
        self._pending.append((row, record))
        if len(self._pending) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        vals = np.stack([np.asarray(r.features["pooled"], np.float32).ravel() for _, r in pending])
        units = vals.shape[1]
        rows = np.broadcast_to(np.array([row for row, _ in pending], np.int64)[:, None], vals.shape)
        peaks = np.stack([np.asarray(r.features["peak"]).reshape(units, -1) for _, r in pending])
        maps = [r.features.get("peak_maps") for _, r in pending]
        shape = next((np.shape(m)[1:] for m in maps if m is not None), (0, 0) if self.maps is None
                     else self.maps.shape[2:])
        maps = np.stack([np.zeros((units, *shape), np.float32) if m is None else np.asarray(m, np.float32)
                         for m in maps])
        for row, r in pending:
            f = r.features
            self.items[row] = (r.item_id, r.case_id, np.asarray(f["cell_size"]), np.asarray(f["map_shape"]),
                               f.get("peak_maps") is not None)
        if self.vals is not None:
            vals, rows = np.concatenate([self.vals, vals]), np.concatenate([self.rows, rows])
            peaks, maps = np.concatenate([self.peaks, peaks]), np.concatenate([self.maps, maps])
        order = np.lexsort((rows, -vals), axis=0)[:self.top_n]  # activation desc, then item order
        self.vals, self.rows = np.take_along_axis(vals, order, 0), np.take_along_axis(rows, order, 0)
        self.peaks = np.take_along_axis(peaks, order[:, :, None], 0)
        self.maps = np.take_along_axis(maps, order[:, :, None, None], 0)
        kept = set(np.unique(self.rows).tolist())
        self.items = {row: v for row, v in self.items.items() if row in kept}

    def objects(self) -> dict[str, bytes]:
        """units/<unit:04d>.json for every unit: its top-N items by activation, highest first."""
        self._flush()
        out: dict[str, bytes] = {}
        for unit in range(self.vals.shape[1]):
            entries = []
            for slot in range(self.vals.shape[0]):
                item_id, case_id, cell_size, map_shape, has_map = self.items[int(self.rows[slot, unit])]
                peak = self.peaks[slot, unit]
                entry = {"item_id": item_id, "case_id": case_id,
                         "activation": round(float(self.vals[slot, unit]), 6),
                         "peak": [int(v) for v in peak], "box": patch_box(peak, cell_size, map_shape)}
                if has_map:
                    entry["map"] = np.round(self.maps[slot, unit], 4).tolist()
                entries.append(entry)
            out[_REL.unit(unit)] = dumps({
                "unit": unit, "ranked_by": "activation (spatial maximum of the unit's map)",
                "box": f"[y0, x0, y1, x1] in the pixels of items/<item_id>/input.png, {PATCH_SIZE} px centred "
                       "on the peak cell, clipped to the image",
                "map": "the unit's feature map in a window of cells centred on the peak (zero outside the map)",
                "map_scale": entries[0]["activation"] if entries else 0.0,
                "patches": entries})
        return out


class UnitRankings:
    """Per class: how often each unit is among an image's top-8 contributors, and its summed contribution."""

    def __init__(self, model: ModelInfo, top: int = TOP_CONTRIBUTORS) -> None:
        self.model, self.top = model, top
        self.weight = np.asarray(model.classifier_weight, np.float32)
        classes, units = self.weight.shape
        self.counts = np.zeros((classes, units), np.int64)
        self.sums = np.zeros((classes, units), np.float64)
        self.images = np.zeros(classes, np.int64)
        self.sources = [{"truth": 0, "predicted": 0} for _ in range(classes)]

    def add(self, record: ItemRecord) -> None:
        c, source = group_class(record, self.model)
        contribution = np.asarray(record.features["pooled"], np.float32).ravel() * self.weight[c]
        k = min(self.top, contribution.size)
        self.counts[c, np.argpartition(-contribution, k - 1)[:k]] += 1
        self.sums[c] += contribution
        self.images[c] += 1
        self.sources[c][source] += 1

    def report(self) -> dict:
        """units/rankings.json: per class, top-8 frequency and mean contribution over that class's images."""
        classes = {}
        for c, name in enumerate(self.model.class_names):
            n, counts = int(self.images[c]), self.counts[c]
            mean = self.sums[c] / n if n else np.zeros(self.weight.shape[1])
            by_count = sorted(np.flatnonzero(counts), key=lambda u: (-counts[u], -mean[u], u))
            by_mean = np.argsort(-mean, kind="stable")
            classes[name] = {
                "images": n, "class_source": class_source(self.sources[c]), "class_source_counts": self.sources[c],
                "top8_frequency": [{"unit": int(u), "count": int(counts[u]), "share": round(counts[u] / n, 6),
                                    "mean_contribution": round(float(mean[u]), 6)} for u in by_count],
                "mean_contribution": [{"unit": int(u), "mean_contribution": round(float(mean[u]), 6),
                                       "top8_count": int(counts[u])} for u in by_mean]}
        return {"contribution": "pooled activation x classifier weight of the class",
                "top": self.top, "shortlist_size": SHORTLIST,
                # DeepMiner gave experts the 20 most frequent top-8 units of each class
                "shortlist": sorted({e["unit"] for c in classes.values() for e in c["top8_frequency"][:SHORTLIST]}),
                "class_source": class_source({"truth": sum(s["truth"] for s in self.sources),
                                              "predicted": sum(s["predicted"] for s in self.sources)}),
                "classes": classes}


class UnitAnalysis:
    """All units/ objects of a run, fed one record at a time."""

    def __init__(self, model: ModelInfo, top_n: int) -> None:
        self.atlas = UnitAtlas(top_n)
        self.rankings = UnitRankings(model) if model.classifier_weight is not None else None
        self.items = 0
        self.missing: list[str] = []  # the first item without the features (and a count)
        self.missing_count = 0

    def add(self, record: ItemRecord) -> None:
        self.items += 1
        if not FIELDS <= set(record.features):
            self.missing_count += 1
            self.missing = self.missing or [record.item_id]
            return
        self.atlas.add(self.items - 1, record)
        if self.rankings is not None:
            self.rankings.add(record)

    def objects(self) -> tuple[dict[str, bytes], dict]:
        """All units/ objects and a summary of what was built."""
        if not self.items:
            return {}, {"skipped": "no items"}
        if self.missing_count:
            return {}, {"skipped": f"{self.missing_count} items without pooled/peak features, e.g. {self.missing[0]}"}
        out = self.atlas.objects()
        summary: dict = {"units": int(self.atlas.vals.shape[1]), "atlas_top_n": min(self.atlas.top_n, self.items)}
        if self.rankings is None:
            summary["rankings"] = "skipped: ModelInfo.classifier_weight missing"
        else:
            rankings = self.rankings.report()
            out[_REL.units("rankings.json")] = dumps(rankings)
            summary["rankings_class_source"] = rankings["class_source"]
        return out, summary
