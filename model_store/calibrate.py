"""The full-mammogram operating points: when does an image count as benign, malignant or normal?

The patch classifier is applied at every position of a full image (DeepMiner's class map), so some
position of almost every normal mammogram looks a little suspicious: taking the most suspicious
position's argmax calls nearly every normal image abnormal. A threshold on the image's lesion
score (the highest benign/malignant probability anywhere, DeepMiner's image score) chosen on the
validation split fixes the operating point, as any screening model needs one. The scores come from
the serving engine's own prepare and infer stages, so the threshold means the same thing online and in
batch runs.

``calibrate_ddsm`` chooses one threshold per lesion class (``medxplain_models.decision``, rule
``per_class_thresholds``) on the validation split: benign and malignant image scores differ in
scale (a benign mass is a milder deviation from glandular tissue than a spiculated one), so one
lesion threshold trades benign recall for normal specificity. The pair maximises the balanced
accuracy (mean per-class recall) over the split's images; ties go to the larger accuracy, then to
the pair nearest the middle of the tied range. ``choose_threshold`` (Youden's J on the highest
lesion score) is the single-threshold rule older bundles carry.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from medxplain_contract.errors import InputError
from medxplain_engine.engine import EngineRequest, Inference
from medxplain_engine.mammo import DDSMEngine
from medxplain_models.bundle import ModelBundle
from medxplain_models.decision import PATCH_WINDOW

log = logging.getLogger(__name__)
ALL_SPLITS = "all"  # every image of the set (image_level uses the same word)


def full_image_scores(bundle: ModelBundle, data_dir: Path, split: str, limit: int | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(lesion score per image, truth label per image) for one split of a synthetic/indexed set.

    The lesion score is the plain class map's highest lesion probability (``input.class_scores`` of a
    response), which the engine reports whatever operating point the bundle has.
    """
    rows = _rows(data_dir, split)[:limit]
    engine = DDSMEngine(bundle, archive_digest="")
    scores = []
    for row in tqdm(rows, desc=f"calibrating on {split}", unit="image", disable=not progress):
        inference = _infer(engine, Path(data_dir) / row["path"])
        scores.append(max(v for k, v in inference.class_scores.items() if k != bundle.class_names[0]))
    return np.asarray(scores), np.asarray([int(r["label"]) for r in rows])


def _infer(engine: DDSMEngine, path: Path) -> Inference:
    """The engine's own prepare and infer stages on one full image (what serving runs before explaining)."""
    (inference,) = engine.infer([engine.prepare(EngineRequest(path.read_bytes(), {"top_k": 0}))])
    if isinstance(inference, InputError):
        raise inference
    return inference


def choose_threshold(lesion_score: np.ndarray, has_lesion: np.ndarray) -> dict:
    """Youden's J (sensitivity + specificity - 1) maximised over the ROC curve's thresholds."""
    if has_lesion.all() or not has_lesion.any():
        raise ValueError("calibration needs images with and without lesions")
    fpr, tpr, thresholds = roc_curve(has_lesion, lesion_score)
    best = int(np.argmax(tpr - fpr))
    threshold = float(min(thresholds[best], 1.0))
    return {"full_image_threshold": threshold, "sensitivity": float(tpr[best]), "specificity": float(1 - fpr[best]),
            "rule": "lesion if the highest benign/malignant probability anywhere in the class map >= threshold"}


def decision_scores(bundle: ModelBundle, data_dir: Path, split: str, score: str = "window",
                    window: int = PATCH_WINDOW, limit: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (images, classes), truth labels) of one split under the ``score`` map.

    The scores are the engine's own (``DDSMEngine.image_scores`` on its ``infer`` result, the
    function the served decision compares with its thresholds), for the candidate rule; the bundle
    is not modified.
    """
    rows = _rows(data_dir, split)[:limit]
    engine = DDSMEngine(bundle, archive_digest="")
    rule = {"score": score, "window": window}
    scores = []
    for row in tqdm(rows, desc=f"calibrating on {split}", unit="image", disable=not progress):
        values = engine.image_scores(_infer(engine, Path(data_dir) / row["path"]), rule)
        scores.append([1.0 - max(values[1:]), *values[1:]])
    return np.asarray(scores), np.asarray([int(r["label"]) for r in rows])


def _rows(data_dir: Path, split: str) -> list[dict]:
    """One split's rows, or every row for ``split="all"`` (a calibration set generated apart from training)."""
    with open(Path(data_dir) / "images.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if split in (r["split"], ALL_SPLITS)]


def _candidates(values: np.ndarray, most: int = 64) -> np.ndarray:
    """Thresholds midway (in log-odds) between neighbouring scores, at most ``most`` of them."""
    logits = np.log(np.clip(values, 1e-6, 1 - 1e-6) / np.clip(1 - values, 1e-6, 1))
    unique = np.unique(logits)
    if len(unique) > most:
        unique = np.unique(np.quantile(unique, np.linspace(0, 1, most)))
    mids = np.concatenate([[unique[0] - 1.0], (unique[1:] + unique[:-1]) / 2, [unique[-1] + 1.0]])
    return 1 / (1 + np.exp(-mids))


def predict_with_thresholds(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Vectorised ``decision.apply_rule`` (per-class rule) for (images, classes) scores."""
    def logit(p):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    margins = logit(scores[:, 1:]) - logit(np.asarray(thresholds))[None]
    best = margins.argmax(axis=1)
    return np.where(margins.max(axis=1) < 0, 0, best + 1)


def choose_class_thresholds(scores: np.ndarray, truth: np.ndarray) -> dict:
    """Per-lesion-class thresholds (two classes: exhaustive search over the candidate pairs)."""
    n_classes = scores.shape[1]
    if n_classes != 3:
        raise ValueError("per-class thresholds are searched for normal + two lesion classes")
    present = np.bincount(truth, minlength=n_classes) > 0
    if not present[0] or not present[1:].any():
        raise ValueError("calibration needs images with and without lesions")
    grid_b, grid_m = _candidates(scores[:, 1]), _candidates(scores[:, 2])
    best, results = None, []
    for i, tb in enumerate(grid_b):
        for j, tm in enumerate(grid_m):
            predicted = predict_with_thresholds(scores, np.array([tb, tm]))
            recall = [float((predicted[truth == c] == c).mean()) for c in range(n_classes) if present[c]]
            key = (round(float(np.mean(recall)), 9), round(float((predicted == truth).mean()), 9))
            results.append((key, i, j))
            if best is None or key > best:
                best = key
    tied = [(i, j) for key, i, j in results if key == best]
    i = int(np.median([t[0] for t in tied]))  # middle of the tied range, per axis
    j = int(np.median([t[1] for t in tied if t[0] == i] or [tied[0][1]]))
    thresholds = np.array([grid_b[i], grid_m[j]])
    predicted = predict_with_thresholds(scores, thresholds)
    return {"thresholds": thresholds.tolist(), "balanced_accuracy": best[0], "accuracy": best[1],
            "recall": [float((predicted[truth == c] == c).mean()) if present[c] else None for c in range(n_classes)]}


def calibrate_ddsm(bundle: ModelBundle, data_dir: Path, split: str = "val", progress: bool = True,
                   score: str = "window", window: int = PATCH_WINDOW) -> dict:
    """Set and return ``bundle.decision`` (per-class thresholds) from one split's full images."""
    scores, truth = decision_scores(bundle, data_dir, split, score, window, progress=progress)
    if (truth > 0).all() or not (truth > 0).any():
        log.warning("no full-image operating point: the %s split lacks images with and without lesions; "
                    "full images fall back to the most suspicious position's argmax", split)
        return {}
    names = bundle.class_names
    chosen = choose_class_thresholds(scores, truth)
    decision = {"rule": "per_class_thresholds", "score": score, "window": window,
                "thresholds": dict(zip(names[1:], chosen["thresholds"])), "split": split, "images": len(truth),
                "on_split": {"balanced_accuracy": chosen["balanced_accuracy"], "accuracy": chosen["accuracy"],
                             "recall": dict(zip(names, chosen["recall"]))}}
    bundle.decision = decision
    return decision
