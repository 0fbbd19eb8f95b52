"""report.json: classification and explanation quality of a run whose inputs carry ground truth.

Classification: per-class one-vs-rest ROC AUC (scikit-learn) on prediction.probabilities,
confusion matrix and accuracy over the items with truth. Explanations: per heatmap method, the
metrics of ``model_store.evaluate`` (pointing game with the tolerances of
docs/explanation-quality.md, relevance mass and rank accuracy) over items with a non-empty
ground-truth mask, plus what a uniform map scores ("chance").
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from medxplain_models.localisation import (
    DDSM_TOLERANCE_PX,
    MRI_TOLERANCE_VOXELS,
    dilate,
    mass_accuracy,
    pointing_game,
    rank_accuracy,
)

TOLERANCE = {"ddsm": (DDSM_TOLERANCE_PX, "px"), "adni": (MRI_TOLERANCE_VOXELS, "voxels")}


def classification_report(truth: list[int], predicted: list[int], probabilities: np.ndarray,
                          class_names: list[str]) -> dict:
    """AUC per class (None when the class or its complement is absent), confusion matrix, accuracy."""
    truth_a, pred_a = np.asarray(truth, int), np.asarray(predicted, int)
    labels = list(range(len(class_names)))
    auc: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        positive = truth_a == c
        auc[name] = float(roc_auc_score(positive, probabilities[:, c])) if 0 < positive.sum() < len(truth_a) else None
    defined = [v for v in auc.values() if v is not None]
    matrix = confusion_matrix(truth_a, pred_a, labels=labels) if len(truth_a) else np.zeros((len(labels),) * 2, int)
    return {"items": len(truth_a), "auc_one_vs_rest": auc,
            "auc_macro": float(np.mean(defined)) if defined else None,
            "auc_score": "prediction.probabilities of result.json",
            "confusion_matrix": {"rows": "truth", "columns": "predicted", "labels": class_names,
                                 "counts": matrix.tolist()},
            "accuracy": float((truth_a == pred_a).mean()) if len(truth_a) else None}


class ExplanationScores:
    """Per-method running lists of per-item localisation scores."""

    def __init__(self, kind: str) -> None:
        self.tolerance, self.unit = TOLERANCE.get(kind, (0, "px"))
        self.scores: dict[str, dict[str, list[float]]] = {}
        self.chance: dict[str, list[float]] = {}
        self.skipped: dict[str, int] = {}
        self.target_is_truth: dict[str, int] = {}
        self._chance_items: set[str] = set()

    def add(self, item_id: str, method: str, heatmap: np.ndarray, mask: np.ndarray, target_is_truth: bool) -> None:
        if heatmap.shape != mask.shape:
            self.skipped[method] = self.skipped.get(method, 0) + 1
            return
        tally = self.scores.setdefault(method, {})
        tally.setdefault("pointing_game", []).append(pointing_game(heatmap, mask, self.tolerance))
        tally.setdefault("mass_accuracy", []).append(mass_accuracy(heatmap, mask))
        tally.setdefault("rank_accuracy", []).append(rank_accuracy(heatmap, mask))
        self.target_is_truth[method] = self.target_is_truth.get(method, 0) + int(target_is_truth)
        if item_id not in self._chance_items:  # a uniform map, once per item
            self._chance_items.add(item_id)
            self.chance.setdefault("pointing_game", []).append(float(dilate(mask, self.tolerance).mean()))
            self.chance.setdefault("mass_accuracy", []).append(float(mask.astype(bool).mean()))
            self.chance.setdefault("rank_accuracy", []).append(float(mask.astype(bool).mean()))

    def report(self) -> dict:
        methods = {}
        for method, tally in sorted(self.scores.items()):
            n = len(tally["pointing_game"])
            methods[method] = {"items": n, "explained_class_is_truth": self.target_is_truth[method],
                               **{k: float(np.mean(v)) for k, v in tally.items()}}
            if self.skipped.get(method):
                methods[method]["skipped_shape_mismatch"] = self.skipped[method]
        return {"tolerance": self.tolerance, "tolerance_unit": self.unit,
                "items": "items with ground truth and a non-empty mask on the heatmap's grid",
                "explained_class": "the run's target (result.json target); explained_class_is_truth counts "
                                   "items whose target was the ground-truth class",
                "chance": {"items": len(self._chance_items), **{k: float(np.mean(v)) for k, v in self.chance.items()}},
                "methods": methods}
