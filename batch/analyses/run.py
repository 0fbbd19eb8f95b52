"""Entry point: every run-level analysis that applies to the run's model kind, fed one item at a time.

:class:`RunAnalyses` is what the merge streams the verified item records into: each analysis keeps
running state (sums and counts, per-unit top-N, the embedding rows on disk, compact score arrays)
rather than the records, so the merge's memory does not grow with the number of items beyond the
score arrays AUC needs and the in-memory FAISS index of large runs. One pass over each record's
heatmaps feeds both the MRI mean maps and the explanation-quality scores, so a heatmap stored in
object storage is loaded once per run. :func:`build_run_outputs` is the same over a list.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from batch.analyses.ann import DEFAULT_THRESHOLD
from batch.analyses.common import dumps, group_class, truth_index
from batch.analyses.embeddings import EmbeddingStore
from batch.analyses.mri import MeanMaps
from batch.analyses.quality import ClassificationTally, ExplanationScores
from batch.analyses.similarity import write_similarity
from batch.analyses.units import UnitAnalysis
from batch.records import ItemRecord, ModelInfo
from medxplain_contract.layout import EMBEDDINGS, IDS, RunLayout

_REL = RunLayout("")  # keys relative to the run

# Run-level summary of the analyses (counts, timings, what was skipped and why) for the manifest.
SUMMARY_KEY = "analyses.json"

Outputs = dict[str, "bytes | Path"]  # relative key -> bytes, or a file under the work folder (large objects)


@contextmanager
def _timed(timings: dict, name: str):
    started = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 3)


class RunAnalyses:
    """Running state of every run-level analysis; :meth:`add` each verified record, then :meth:`finish`.

    ``add`` is all-or-nothing: a record's heatmaps and mask are loaded (and verified) before any
    analysis sees it, so an :class:`IntegrityError` from a load leaves the state untouched and the
    merge can leave that item out without starting over. Large objects are files in ``workdir``.
    """

    def __init__(self, model: ModelInfo, workdir: Path, *, atlas_top_n: int = 64, neighbours: int = 20,
                 ann_threshold: int = DEFAULT_THRESHOLD) -> None:
        self.model, self.workdir, self.neighbours, self.ann_threshold = model, Path(workdir), neighbours, ann_threshold
        self.items = 0
        self.timings: dict[str, float] = {}
        self.embeddings = EmbeddingStore(self.workdir)
        self.without_embedding = 0
        self.cases: set[str] | None = None
        self.units = UnitAnalysis(model, atlas_top_n) if model.kind == "ddsm" else None
        self.mean_maps = MeanMaps(model.class_names) if model.kind == "adni" else None
        self.scores = ExplanationScores(model.kind)
        self.classification = ClassificationTally(model.class_names)
        self.affine: tuple[str, np.ndarray] | None = None  # (first item with a known input affine, its affine)
        self.grid_error: str | None = None

    def add(self, record: ItemRecord) -> None:
        model, names = self.model, self.model.class_names
        with _timed(self.timings, "heatmaps"):
            loaded = self._load_maps(record)  # may raise IntegrityError: nothing below has run yet
        self.items += 1
        truth = truth_index(record, model)
        with _timed(self.timings, "embeddings_similarity"):
            if "embedding" in record.features:
                self.embeddings.add(record.item_id, record.case_id, None if truth is None else names[truth],
                                    names[record.predicted], record.features["embedding"])
            else:
                self.without_embedding += 1
        if self.units is not None:
            with _timed(self.timings, "units"):
                self.units.add(record)
        with _timed(self.timings, "heatmaps"):
            self._add_maps(record, *loaded)
        with _timed(self.timings, "report"):
            if truth is not None:
                self.classification.add(truth, record.predicted, record.result["prediction"]["probabilities"],
                                        record.result.get("input", {}).get("class_scores"))

    def _load_maps(self, record: ItemRecord) -> tuple[list[tuple[str, np.ndarray]], np.ndarray | None]:
        """The heatmaps this record contributes and its mask (the only object loads of an add)."""
        methods = sorted(record.result.get("heatmaps") or {})
        _, source = group_class(record, self.model)
        mask = record.load_mask() if methods and source == "truth" else None
        has_mask = mask is not None and bool(np.any(mask))
        if self.mean_maps is None and not has_mask:
            return [], None
        return ([(m, np.asarray(record.load_heatmap(m), np.float32)) for m in methods],
                np.asarray(mask).astype(bool) if has_mask else None)

    def _add_maps(self, record: ItemRecord, heatmaps: list[tuple[str, np.ndarray]], mask: np.ndarray | None) -> None:
        cls, source = group_class(record, self.model)
        if self.mean_maps is not None:
            self.mean_maps.add_subject(cls, source)
            for method, heatmap in heatmaps:
                self.mean_maps.add(cls, method, heatmap, (record.result.get("regions") or {}).get(method))
            self._check_grid(record)
        if mask is not None:
            target = record.result.get("target", {}).get("index", record.predicted)
            self.scores.add_item(heatmaps, mask, target == cls)

    def _check_grid(self, record: ItemRecord) -> None:
        """Each heatmap lies on its input's sent grid; all must agree, or a mean over them means nothing."""
        affine = _heatmap_affine(record)
        if affine is None or self.grid_error:
            return
        if self.affine is None:
            self.affine = (record.item_id, affine)
        elif not np.allclose(affine, self.affine[1], atol=1e-4):
            self.grid_error = (f"MRI heatmaps of items {self.affine[0]} and {record.item_id} lie on different "
                               "grids; a run-level mean map needs inputs on one grid")

    def finish(self) -> Outputs:
        """Keys relative to the run prefix (docs/architecture.md "Run-level analyses") -> bytes or file.

        Always includes SUMMARY_KEY ("analyses.json"): items, which objects were built or skipped and
        why, and seconds per analysis; the manifest can embed it.
        """
        model = self.model
        out: Outputs = {}
        summary: dict = {"items": self.items, "model": {"kind": model.kind, "name": model.name,
                                                         "version": model.version},
                         "seconds": self.timings, "skipped": {}}
        self.embeddings.close()
        with _timed(self.timings, "embeddings_similarity"):
            store = self.embeddings
            if self.items and not self.without_embedding:
                out[_REL.index(IDS)] = store.write_ids(self.workdir / IDS)
                out[_REL.index(EMBEDDINGS)] = store.write_npy(self.workdir / EMBEDDINGS)
                files, search = write_similarity(store, self.workdir, self.neighbours, self.ann_threshold)
                out.update(files)
                summary["embeddings"] = {"items": store.n, "dim": int(store.dim or 0), "neighbours": self.neighbours,
                                         "cases": store.cases, **search}
            else:
                summary["skipped"]["index"] = "no items" if not self.items else "items without features['embedding']"

        if self.units is not None:
            with _timed(self.timings, "units"):
                units, summary["units"] = self.units.objects()
                out.update(units)
        else:
            summary["skipped"]["units"] = (
                "unit atlas and rankings are built for 2D mammography only: MRI result.json units carry per-subject "
                "Grad-CAM weights (a first-order estimate) for the target class's top-k units only, so frequency and "
                "mean-contribution rankings over a run would be biased, and there are no patches to annotate")

        if self.mean_maps is not None and self.items:
            with _timed(self.timings, "mri"):
                try:
                    affine, source = self._grid_affine()
                except ValueError as err:  # inputs on several grids, or none known: no mean map rather than a wrong one
                    summary["skipped"]["mri"] = str(err)
                else:
                    objects, mri_summary = self.mean_maps.objects(affine, source)
                    out.update(objects)
                    out[_REL.mri("summary.json")] = dumps(mri_summary)
                    summary["mri"] = {c: v["subjects"] for c, v in mri_summary["classes"].items()}
                    summary["mri_affine_source"] = source

        with _timed(self.timings, "report"):
            if len(self.classification):
                report = {"classification": self.classification.report(), "explanations": self.scores.report(),
                          "items": self.items, "items_with_truth": len(self.classification)}
                out[_REL.report] = dumps(report)
                summary["report"] = {"items_with_truth": len(self.classification),
                                     "auc_macro": report["classification"]["auc_macro"]}
            else:
                summary["skipped"]["report"] = "no item has ground truth"

        summary["objects"] = len(out)
        out[SUMMARY_KEY] = dumps(summary, indent=1)
        return out

    def _grid_affine(self) -> tuple[np.ndarray, str]:
        """The affine of the grid the run's MRI heatmaps are on; ValueError when it is not known.

        Each heatmap lies on its input's sent grid (``input.geometry.affine``, before the engine
        recorded geometry ``input.affine``; the NIfTI object carries the same affine). Records that
        carry no input geometry (built in memory) fall back to the model record's template grid;
        there is no identity fallback.
        """
        if self.grid_error:
            raise ValueError(self.grid_error)
        if self.affine is not None:
            return self.affine[1], "heatmap grid (the items' input affine)"
        if self.model.grid_affine is not None:
            return np.asarray(self.model.grid_affine, np.float64), "model"
        raise ValueError("no affine is known for the run's MRI heatmaps (no input affine, no model grid): "
                         "mean maps are not written without one")


def build_run_outputs(records: list[ItemRecord], model: ModelInfo, *, atlas_top_n: int = 64,
                      neighbours: int = 20, progress: bool = False,
                      ann_threshold: int = DEFAULT_THRESHOLD) -> dict[str, bytes]:
    """:class:`RunAnalyses` over records held in memory, every output as bytes (tests, small runs)."""
    del progress  # kept for callers; the merge shows its own progress
    with tempfile.TemporaryDirectory(prefix="medxai-analyses-") as folder:
        analyses = RunAnalyses(model, Path(folder), atlas_top_n=atlas_top_n, neighbours=neighbours,
                               ann_threshold=ann_threshold)
        for record in records:
            analyses.add(record)
        return {k: v.read_bytes() if isinstance(v, Path) else v for k, v in analyses.finish().items()}


def _heatmap_affine(record: ItemRecord) -> np.ndarray | None:
    meta = record.result.get("input") or {}
    affine = (meta.get("geometry") or {}).get("affine") or meta.get("affine")
    return None if affine is None else np.asarray(affine, np.float64)
