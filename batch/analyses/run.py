"""Entry point: every run-level analysis that applies to the run's model kind, as objects.

One pass over the records' heatmaps feeds both the MRI mean maps and the explanation-quality
scores, so a heatmap stored in object storage is loaded once per run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from batch.analyses.common import dumps, group_class, truth_index
from batch.analyses.embeddings import embedding_matrix, npy_bytes
from batch.analyses.mri import MeanMaps
from batch.analyses.quality import ExplanationScores, classification_report
from batch.analyses.similarity import build_similarity
from batch.analyses.units import build_units
from batch.records import ItemRecord, ModelInfo
from medxplain_contract.layout import RunLayout

_REL = RunLayout("")  # keys relative to the run

# Run-level summary of the analyses (counts, timings, what was skipped and why) for the manifest.
SUMMARY_KEY = "analyses.json"


@contextmanager
def _timed(timings: dict, name: str):
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def build_run_outputs(records: list[ItemRecord], model: ModelInfo, *, atlas_top_n: int = 64,
                      neighbours: int = 20, progress: bool = False) -> dict[str, bytes]:
    """Keys relative to the run prefix (docs/architecture.md "Run-level analyses") -> object bytes.

    Always includes SUMMARY_KEY ("analyses.json"): items, which objects were built or skipped and
    why, and seconds per analysis; the manifest can embed it.
    """
    out: dict[str, bytes] = {}
    timings: dict[str, float] = {}
    summary: dict = {"items": len(records), "model": {"kind": model.kind, "name": model.name, "version": model.version},
                     "seconds": timings, "skipped": {}}
    names = model.class_names

    with _timed(timings, "embeddings_similarity"):
        if records and all("embedding" in r.features for r in records):
            ids, matrix = embedding_matrix(records)
            out[_REL.index("ids.json")] = dumps(ids)
            out[_REL.index("embeddings.npy")] = npy_bytes(matrix)
            truth = [truth_index(r, model) for r in records]
            out[_REL.index("similarity.json")] = build_similarity(
                ids, matrix, [r.case_id for r in records], [None if t is None else names[t] for t in truth],
                [names[r.predicted] for r in records], k=neighbours)
            summary["embeddings"] = {"items": len(ids), "dim": int(matrix.shape[1]), "neighbours": neighbours,
                                     "cases": len({r.case_id for r in records})}
        else:
            summary["skipped"]["index"] = "no items" if not records else "items without features['embedding']"

    if model.kind == "ddsm":
        with _timed(timings, "units"):
            units, summary["units"] = build_units(records, model, atlas_top_n)
            out.update(units)
    else:
        summary["skipped"]["units"] = (
            "unit atlas and rankings are built for 2D mammography only: MRI result.json units carry per-subject "
            "Grad-CAM weights (a first-order estimate) for the target class's top-k units only, so frequency and "
            "mean-contribution rankings over a run would be biased, and there are no patches to annotate")

    with _timed(timings, "heatmaps"):
        mean_maps, scores = _heatmap_pass(records, model, progress)
    if mean_maps is not None:
        with _timed(timings, "mri"):
            try:
                affine, source = _grid_affine(records, model)
            except ValueError as err:  # inputs on several grids, or none known: no mean map rather than a wrong one
                summary["skipped"]["mri"] = str(err)
            else:
                objects, mri_summary = mean_maps.objects(affine, source)
                out.update(objects)
                out[_REL.mri("summary.json")] = dumps(mri_summary)
                summary["mri"] = {c: v["subjects"] for c, v in mri_summary["classes"].items()}
                summary["mri_affine_source"] = source

    with _timed(timings, "report"):
        labelled = [(r, truth_index(r, model)) for r in records]
        labelled = [(r, t) for r, t in labelled if t is not None]
        if labelled:
            probabilities = np.array([[float(r.result["prediction"]["probabilities"][n]) for n in names]
                                      for r, _ in labelled])
            truth, predicted = [t for _, t in labelled], [r.predicted for r, _ in labelled]
            classification = classification_report(truth, predicted, probabilities, names)
            image_scores = [r.result.get("input", {}).get("class_scores") for r, _ in labelled]
            if all(image_scores):  # full mammograms: DeepMiner's image score (class-map maximum) too
                scores_matrix = np.array([[float(s[n]) for n in names] for s in image_scores])
                # The 'normal' map is near 1 somewhere on every image, so its maximum ranks nothing:
                # an image is normal when no position is suspicious, i.e. 1 - its highest lesion score.
                scores_matrix[:, 0] = 1.0 - scores_matrix[:, 1:].max(axis=1)
                classification["auc_one_vs_rest_image_score"] = classification_report(
                    truth, predicted, scores_matrix, names)["auc_one_vs_rest"]
                classification["image_score"] = (f"lesion classes: class-map maximum; {names[0]}: 1 - the highest "
                                                 "lesion-class maximum")
            report = {"classification": classification,
                      "explanations": scores.report(), "items": len(records), "items_with_truth": len(labelled)}
            out[_REL.report] = dumps(report)
            summary["report"] = {"items_with_truth": len(labelled), "auc_macro": report["classification"]["auc_macro"]}
        else:
            summary["skipped"]["report"] = "no item has ground truth"

    summary["objects"] = len(out)
    out[SUMMARY_KEY] = dumps(summary, indent=1)
    return out


def _heatmap_pass(records: list[ItemRecord], model: ModelInfo, progress: bool) -> tuple[MeanMaps | None, ExplanationScores]:
    """Load each stored heatmap once; feed the MRI means (adni) and the quality scores (items with a mask)."""
    mean_maps = MeanMaps(model.class_names) if model.kind == "adni" and records else None
    scores = ExplanationScores(model.kind)
    for record in tqdm(records, desc="run analyses: heatmaps", unit="item", disable=not progress):
        methods = sorted(record.result.get("heatmaps") or {})
        cls, source = group_class(record, model)
        if mean_maps is not None:
            mean_maps.add_subject(cls, source)
        mask = record.load_mask() if methods and source == "truth" else None
        has_mask = mask is not None and bool(np.any(mask))
        if mean_maps is None and not has_mask:
            continue
        target = record.result.get("target", {}).get("index", record.predicted)
        for method in methods:
            heatmap = np.asarray(record.load_heatmap(method), np.float32)
            if mean_maps is not None:
                mean_maps.add(cls, method, heatmap, (record.result.get("regions") or {}).get(method))
            if has_mask:
                scores.add(record.item_id, method, heatmap, np.asarray(mask).astype(bool), target == cls)
    return mean_maps, scores


def _grid_affine(records: list[ItemRecord], model: ModelInfo) -> tuple[np.ndarray, str]:
    """The affine of the grid the run's MRI heatmaps are on; ValueError when it is not known.

    Each heatmap lies on its input's sent grid (``input.geometry.affine``, before the engine
    recorded geometry ``input.affine``; the NIfTI object carries the same affine). All must agree, or
    a mean over them means nothing. Records that carry no input geometry (built in memory) fall back
    to the model record's template grid; there is no identity fallback.
    """
    known = [(r.item_id, a) for r in records if (a := _heatmap_affine(r)) is not None]
    if known:
        first_id, first = known[0]
        for item_id, affine in known[1:]:
            if not np.allclose(affine, first, atol=1e-4):
                raise ValueError(f"MRI heatmaps of items {first_id} and {item_id} lie on different grids; "
                                 "a run-level mean map needs inputs on one grid")
        return first, "heatmap grid (the items' input affine)"
    if model.grid_affine is not None:
        return np.asarray(model.grid_affine, np.float64), "model"
    raise ValueError("no affine is known for the run's MRI heatmaps (no input affine, no model grid): "
                     "mean maps are not written without one")


def _heatmap_affine(record: ItemRecord) -> np.ndarray | None:
    meta = record.result.get("input") or {}
    affine = (meta.get("geometry") or {}).get("affine") or meta.get("affine")
    return None if affine is None else np.asarray(affine, np.float64)
