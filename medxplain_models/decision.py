"""The full-mammogram decision: image scores from the class map, and the calibrated rule on them.

One module, used by the serving engine (``DDSMEngine._decide``), by calibration and by the
image-level evaluation, so the label a user gets and the label that is measured are the same code.

Image scores. A patch classifier applied at every position of a full image gives DeepMiner's class
map; each lesion class's image score is the map's maximum (multiple-instance learning: an image is
as suspicious as its most suspicious part). Two maps are supported:

- ``position``: the fc layer as a 1x1 convolution on each ``layer4`` cell (DeepMiner's map);
- ``window``: ``layer4`` max-pooled over a patch-sized window (7 cells ~ 227 px at stride 32)
  before the fc, i.e. the patch classifier's own input (global max pooling over a patch) computed
  at every window of the image with shared convolutions. A 227x227 patch still gives exactly the
  patch classifier's output; on a full image each window is read the way training read a patch.

Rule (``per_class_thresholds``): each lesion class c has a threshold t_c chosen on a validation
split (``model_store.calibrate``); the image is normal when every score is below its threshold,
else the lesion class with the largest log-odds margin ``logit(s_c) - logit(t_c)``. The older
single threshold (``full_image_threshold`` on the highest lesion score, then the higher score)
is still read from bundles that carry only it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# layer4 cells of one 227 px patch: the five stride-2 stages each round up (227 -> 114 -> 57 -> 29 -> 15 -> 8),
# so a window of 8 reads a full-image map exactly as the patch classifier reads a patch.
PATCH_WINDOW = 8
_EPS = 1e-6


def class_map_logits(model: nn.Module, fmap: torch.Tensor, score: str = "position",
                     window: int = PATCH_WINDOW) -> torch.Tensor:
    """(N, classes, h', w') logits of the chosen class map from a ``layer4`` map (N, units, h, w)."""
    if score == "window":
        k = min(window, fmap.shape[-2], fmap.shape[-1])
        fmap = F.max_pool2d(fmap, k, stride=1)
    elif score != "position":
        raise ValueError(f"unknown image score {score!r}")
    return model.class_map(fmap)


def image_scores(model: nn.Module, fmap: torch.Tensor, decision: dict) -> torch.Tensor:
    """(classes,) image score per class: the maximum of the decision's class-probability map."""
    logits = class_map_logits(model, fmap, decision.get("score", "position"), decision.get("window", PATCH_WINDOW))
    return torch.softmax(logits, dim=1)[0].flatten(1).amax(dim=1)


def score_vector(scores: torch.Tensor | list[float]) -> list[float]:
    """Per-class image-level scores for ROC analysis: lesion classes their map maximum, normal
    ``1 - the highest lesion score`` (the normal map is near 1 somewhere on every image)."""
    values = [float(s) for s in scores]
    return [1.0 - max(values[1:]), *values[1:]]


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def apply_rule(scores: list[float], decision: dict, class_names: list[str]) -> int | None:
    """Label index from image scores under the bundle's decision, None without an operating point."""
    thresholds = decision.get("thresholds")
    if thresholds:
        margins = [_logit(scores[c]) - _logit(float(thresholds[class_names[c]])) for c in range(1, len(scores))]
        best = max(range(len(margins)), key=margins.__getitem__)
        return 0 if margins[best] < 0 else 1 + best
    threshold = decision.get("full_image_threshold")
    if threshold is None:
        return None
    lesion = scores[1:]
    return 0 if max(lesion) < threshold else 1 + max(range(len(lesion)), key=lesion.__getitem__)


def decide(scores: torch.Tensor, decision: dict, class_names: list[str]) -> dict | None:
    """``prediction.decision`` of the response (docs/api.md), None when the model has no operating point.

    ``lesion_score`` / ``threshold`` keep their meaning under both rules: the image is normal exactly
    when ``lesion_score < threshold`` (per-class rule: those of the lesion class with the best margin).
    """
    values = [float(s) for s in scores]
    index = apply_rule(values, decision, class_names)
    if index is None:
        return None
    thresholds = decision.get("thresholds")
    if not thresholds:
        return {"label_index": index, "rule": "lesion_score >= threshold", "lesion_score": max(values[1:]),
                "threshold": float(decision["full_image_threshold"])}
    per_class = {n: float(thresholds[n]) for n in class_names[1:]}
    lead = 1 + max(range(len(values) - 1), key=lambda c: _logit(values[1 + c]) - _logit(per_class[class_names[1 + c]]))
    return {"label_index": index, "rule": "per_class_thresholds", "lesion_score": values[lead],
            "threshold": per_class[class_names[lead]], "score": decision.get("score", "position"),
            "scores": {n: v for n, v in zip(class_names[1:], values[1:])}, "thresholds": per_class}
