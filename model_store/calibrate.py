"""The full-mammogram operating point: when does an image count as showing a lesion?

The patch classifier is applied at every position of a full image (DeepMiner's class map), so some
position of almost every normal mammogram looks a little suspicious: taking the most suspicious
position's argmax calls nearly every normal image abnormal. A threshold on the image's lesion
score (the highest benign/malignant probability anywhere, DeepMiner's image score) chosen on the
validation split fixes the operating point, as any screening model needs one. The scores come from
the serving engine itself, so the threshold means the same thing online and in batch runs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from model_store.bundle import ModelBundle

log = logging.getLogger(__name__)


def full_image_scores(bundle: ModelBundle, data_dir: Path, split: str, limit: int | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(lesion score per image, truth label per image) for one split of a synthetic/indexed set."""
    from handlers.engine import DDSMEngine  # the engine depends on model_store, not the reverse

    with open(Path(data_dir) / "images.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split][:limit]
    engine = DDSMEngine(bundle, archive_digest="")
    saved, engine.bundle.decision = bundle.decision, {}  # score with the plain class map
    try:
        scores = []
        for row in tqdm(rows, desc=f"calibrating on {split}", unit="image", disable=not progress):
            prepared = engine.prepare((Path(data_dir) / row["path"]).read_bytes(), _options(engine))
            engine.forward(prepared.mode, [prepared])
            class_scores = prepared.meta["class_scores"]
            scores.append(max(v for k, v in class_scores.items() if k != bundle.class_names[0]))
    finally:
        bundle.decision = saved
    return np.asarray(scores), np.asarray([int(r["label"]) for r in rows])


def _options(engine):
    from handlers.options import parse_options

    return parse_options({"top_k": 0}, engine.bundle.class_names, engine.methods, (), engine.model.num_units)


def choose_threshold(lesion_score: np.ndarray, has_lesion: np.ndarray) -> dict:
    """Youden's J (sensitivity + specificity - 1) maximised over the ROC curve's thresholds."""
    if has_lesion.all() or not has_lesion.any():
        raise ValueError("calibration needs images with and without lesions")
    fpr, tpr, thresholds = roc_curve(has_lesion, lesion_score)
    best = int(np.argmax(tpr - fpr))
    threshold = float(min(thresholds[best], 1.0))
    return {"full_image_threshold": threshold, "sensitivity": float(tpr[best]), "specificity": float(1 - fpr[best]),
            "rule": "lesion if the highest benign/malignant probability anywhere in the class map >= threshold"}


def calibrate_ddsm(bundle: ModelBundle, data_dir: Path, split: str = "val", progress: bool = True) -> dict:
    """Set and return ``bundle.decision`` from one split's full images."""
    scores, truth = full_image_scores(bundle, data_dir, split, progress=progress)
    if (truth > 0).all() or not (truth > 0).any():
        log.warning("no full-image operating point: the %s split lacks images with and without lesions; "
                    "full images fall back to the most suspicious position's argmax", split)
        return {}
    decision = {**choose_threshold(scores, truth > 0), "split": split, "images": len(truth)}
    bundle.decision = decision
    return decision
