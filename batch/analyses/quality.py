"""report.json: classification and explanation quality of a run whose inputs carry ground truth.

Classification: per-class one-vs-rest ROC AUC (scikit-learn) on prediction.probabilities,
confusion matrix and accuracy over the items with truth. Explanations: per heatmap method, the
metrics of ``model_store.evaluate`` (pointing game with the tolerances of
docs/explanation-quality.md, relevance mass and rank accuracy) over items with a non-empty
ground-truth mask, plus what a uniform map scores ("chance"). Both are fed one item at a time by
the streaming merge.
"""

from __future__ import annotations

from array import array

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
    """Per-method running sums and counts of per-item localisation scores (means need no per-item list)."""

    def __init__(self, kind: str) -> None:
        self.tolerance, self.unit = TOLERANCE.get(kind, (0, "px"))
        self.sums: dict[str, dict[str, float]] = {}
        self.counts: dict[str, int] = {}
        self.chance = {"pointing_game": 0.0, "mass_accuracy": 0.0, "rank_accuracy": 0.0}
        self.chance_items = 0
        self.skipped: dict[str, int] = {}
        self.target_is_truth: dict[str, int] = {}

    def add_item(self, methods: list[tuple[str, np.ndarray]], mask: np.ndarray, target_is_truth: bool) -> None:
        """One item's heatmaps against its mask (the chance level counted once per item)."""
        counted = False
        for method, heatmap in methods:
            if heatmap.shape != mask.shape:
                self.skipped[method] = self.skipped.get(method, 0) + 1
                continue
            tally = self.sums.setdefault(method, {"pointing_game": 0.0, "mass_accuracy": 0.0, "rank_accuracy": 0.0})
            tally["pointing_game"] += pointing_game(heatmap, mask, self.tolerance)
            tally["mass_accuracy"] += mass_accuracy(heatmap, mask)
            tally["rank_accuracy"] += rank_accuracy(heatmap, mask)
            self.counts[method] = self.counts.get(method, 0) + 1
            self.target_is_truth[method] = self.target_is_truth.get(method, 0) + int(target_is_truth)
            if not counted:  # a uniform map, once per item
                counted = True
                self.chance_items += 1
                self.chance["pointing_game"] += float(dilate(mask, self.tolerance).mean())
                self.chance["mass_accuracy"] += float(mask.astype(bool).mean())
                self.chance["rank_accuracy"] += float(mask.astype(bool).mean())

    def report(self) -> dict:
        methods = {}
        for method, tally in sorted(self.sums.items()):
            n = self.counts[method]
            methods[method] = {"items": n, "explained_class_is_truth": self.target_is_truth[method],
                               **{k: float(v / n) for k, v in tally.items()}}
            if self.skipped.get(method):
                methods[method]["skipped_shape_mismatch"] = self.skipped[method]
        chance = {k: float(v / self.chance_items) for k, v in self.chance.items()} if self.chance_items else {}
        return {"tolerance": self.tolerance, "tolerance_unit": self.unit,
                "items": "items with ground truth and a non-empty mask on the heatmap's grid",
                "explained_class": "the run's target (result.json target); explained_class_is_truth counts "
                                   "items whose target was the ground-truth class",
                "chance": {"items": self.chance_items, **chance},
                "methods": methods}


class ClassificationTally:
    """What report.json's classification part needs, kept compactly (AUC needs every item's scores).

    ``array`` of float64 / int: 8 bytes per class per labelled item (24 MB at 10^6 items, 3 classes),
    rather than Python lists of floats (~4x that).
    """

    def __init__(self, class_names: list[str]) -> None:
        self.names = class_names
        self.truth, self.predicted = array("q"), array("q")
        self.probabilities, self.image_scores = array("d"), array("d")
        self.all_image_scores = True

    def add(self, truth: int, predicted: int, probabilities: dict, image_scores: dict | None) -> None:
        self.truth.append(truth)
        self.predicted.append(predicted)
        self.probabilities.extend(float(probabilities[n]) for n in self.names)
        if image_scores and self.all_image_scores:
            self.image_scores.extend(float(image_scores[n]) for n in self.names)
        else:
            self.all_image_scores = False

    def __len__(self) -> int:
        return len(self.truth)

    def report(self) -> dict:
        names, n = self.names, len(self.truth)
        truth, predicted = list(self.truth), list(self.predicted)
        probabilities = np.frombuffer(self.probabilities, np.float64).reshape(n, len(names))
        classification = classification_report(truth, predicted, probabilities, names)
        if self.all_image_scores:  # full mammograms: DeepMiner's image score (class-map maximum) too
            scores_matrix = np.frombuffer(self.image_scores, np.float64).reshape(n, len(names)).copy()
            # The 'normal' map is near 1 somewhere on every image, so its maximum ranks nothing:
            # an image is normal when no position is suspicious, i.e. 1 - its highest lesion score.
            scores_matrix[:, 0] = 1.0 - scores_matrix[:, 1:].max(axis=1)
            classification["auc_one_vs_rest_image_score"] = classification_report(
                truth, predicted, scores_matrix, names)["auc_one_vs_rest"]
            classification["image_score"] = (f"lesion classes: class-map maximum; {names[0]}: 1 - the highest "
                                             "lesion-class maximum")
        return classification
