"""Classification metrics written to ``metrics.json`` and the model card."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score


def classification_report(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Per-class one-vs-rest ROC AUC (from probabilities, not hard labels), accuracy, confusion matrix."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    auc = {}
    for c, name in enumerate(class_names):
        positives = labels == c
        auc[name] = float(roc_auc_score(positives, probabilities[:, c])) if 0 < positives.sum() < len(labels) else None
    defined = [v for v in auc.values() if v is not None]
    return {
        "n": len(labels),
        "roc_auc": auc,
        "macro_roc_auc": float(np.mean(defined)) if defined else None,
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(len(class_names)))).tolist(),
        "class_names": list(class_names),
    }
