"""Image-level evaluation of the full-mammogram decision users get, on held-out synthetic images.

Every image goes through ``Engine.run`` (the path TorchServe and the batch job call), and the
figures are computed from the response: ``prediction.label_index`` (the calibrated decision,
``medxplain_models.decision``) for accuracy, recall and the confusion matrix, and the decision's image
scores for ROC AUC (lesion classes: their map maximum; normal: 1 - the highest lesion score). The
uncalibrated rule (argmax of the distribution at the most suspicious position) is reported next to
it, so the gain of the operating point is measured on the same images.

Cases: the four views of a case are also combined (``cases``): a case's score per lesion class is
the maximum over its views and its label the most severe view label, as a reader reports a case.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score
from tqdm import tqdm

from medxplain_contract.errors import InputError
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.decision import score_vector
from model_store.calibrate import ALL_SPLITS
from model_store.synth.mammo import read_images_csv

REPORT_KEY = "image_level"


def figures(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None, class_names: list[str]) -> dict:
    """Macro / per-class one-vs-rest ROC AUC (from scores), accuracy, per-class recall, confusion matrix."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    out: dict = {"n": len(truth), "class_names": list(class_names)}
    if scores is not None:
        auc = {n: (float(roc_auc_score(truth == c, scores[:, c])) if 0 < (truth == c).sum() < len(truth) else None)
               for c, n in enumerate(class_names)}
        defined = [v for v in auc.values() if v is not None]
        out.update(roc_auc=auc, macro_roc_auc=float(np.mean(defined)) if defined else None)
    out.update(accuracy=float((predicted == truth).mean()) if len(truth) else None,
               recall={n: (float((predicted[truth == c] == c).mean()) if (truth == c).any() else None)
                       for c, n in enumerate(class_names)},
               confusion_matrix=confusion_matrix(truth, predicted, labels=list(range(len(class_names)))).tolist())
    return out


def evaluate_images(model_dir: Path, data_dir: Path, split: str = "test", limit: int | None = None,
                    progress: bool = True) -> dict:
    """Image- and case-level figures of the served decision on one split of an ``images.csv`` set.

    ``split="all"`` takes every image: for a set generated (or collected) apart from the training data,
    where each split is held out, so the figures rest on more images than one split holds.
    """
    engine = Engine.from_model_dir(model_dir)
    if engine.kind != "ddsm":
        raise ValueError("image-level evaluation is for full mammograms (ddsm bundles)")
    names = engine.bundle.class_names
    rows = [r for r in read_images_csv(data_dir) if split in (r["split"], ALL_SPLITS)][:limit]
    if not rows:
        raise ValueError(f"no images in split {split!r}")
    started = time.monotonic()
    truth, served, uncalibrated, scores = [], [], [], []
    for row in tqdm(rows, desc=f"image-level {split}", unit="image", disable=not progress):
        (result,) = engine.run([EngineRequest((Path(data_dir) / row["path"]).read_bytes(), {"top_k": 0})])
        refused = result if isinstance(result, InputError) else None
        if refused is not None:
            raise ValueError(f"image {row['image_id']} was refused: {refused.message}")
        prediction = result["prediction"]
        decision = prediction.get("decision") or {}
        per_class = decision.get("scores") or {n: v for n, v in result["input"]["class_scores"].items()
                                               if n != names[0]}
        truth.append(row["label"])
        served.append(prediction["label_index"])
        uncalibrated.append(int(np.argmax([prediction["probabilities"][n] for n in names])))
        scores.append(score_vector([0.0, *(per_class[n] for n in names[1:])]))
    truth_a, served_a, scores_a = np.array(truth), np.array(served), np.array(scores)
    report = {
        "split": split, "images": len(rows), "seconds": round(time.monotonic() - started, 1),
        "decision": {k: v for k, v in engine.bundle.decision.items() if k != "on_split"},
        "served": figures(truth_a, served_a, scores_a, names),
        "uncalibrated": figures(truth_a, np.array(uncalibrated), None, names),
        "cases": _case_figures(rows, truth_a, served_a, scores_a, names),
        "scores": "lesion classes: the decision's class-map maximum; normal: 1 - the highest lesion score",
    }
    return report


def _case_figures(rows: list[dict], truth: np.ndarray, served: np.ndarray, scores: np.ndarray,
                  class_names: list[str]) -> dict:
    """Four views -> one case: max score per lesion class, most severe label (truth and decision)."""
    cases = sorted({r["case_id"] for r in rows})
    index = {c: [i for i, r in enumerate(rows) if r["case_id"] == c] for c in cases}
    case_truth = np.array([truth[index[c]].max() for c in cases])
    case_pred = np.array([served[index[c]].max() for c in cases])
    lesion = np.array([scores[index[c], 1:].max(axis=0) for c in cases])
    case_scores = np.column_stack([1.0 - lesion.max(axis=1), lesion])
    return {**figures(case_truth, case_pred, case_scores, class_names),
            "rule": "case label = most severe view decision; case score = max over views"}


def record(model_dir: Path, report: dict) -> None:
    """Write the report into the bundle's ``metrics.json`` and ``model_card.json`` (``image_level``)."""
    model_dir = Path(model_dir)
    for name, nest in (("metrics.json", None), ("model_card.json", "metrics")):
        path = model_dir / name
        doc = json.loads(path.read_text()) if path.exists() else {}
        target = doc.setdefault(nest, {}) if nest else doc
        target[REPORT_KEY] = report
        path.write_text(json.dumps(doc, indent=2, sort_keys=name == "model_card.json") + "\n")


def to_markdown(report: dict) -> str:
    """A short table of the served and the uncalibrated decision (and the case level)."""
    names = report["served"]["class_names"]
    lines = [f"image-level decision, split `{report['split']}`, {report['images']} images",
             "", "| decision | macro ROC AUC | accuracy | " + " | ".join(f"recall {n}" for n in names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for label, fig in (("served (calibrated)", report["served"]), ("uncalibrated argmax", report["uncalibrated"]),
                       ("case level (4 views)", report["cases"])):
        auc = fig.get("macro_roc_auc")
        recall = " | ".join("-" if fig["recall"][n] is None else f"{fig['recall'][n]:.2f}" for n in names)
        lines.append(f"| {label} | {'-' if auc is None else f'{auc:.3f}'} | {fig['accuracy']:.3f} | {recall} |")
    lines += ["", (f"confusion matrix (rows truth, columns decision, {', '.join(names)}): "
                   f"{report['served']['confusion_matrix']}")]
    return "\n".join(lines) + "\n"
