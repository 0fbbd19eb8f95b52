"""Deletion and insertion curves (Petsiuk et al., RISE, 2018): does the map's order matter to the model?

Deletion sets the most relevant pixels (voxels) to the baseline first, in ``steps`` equal shares,
and records the explained class's probability after each share; insertion starts from the baseline
and puts the most relevant pixels back first. A faithful map makes the probability fall fast
(low deletion AUC) and rise fast (high insertion AUC). AUC = trapezoid area over the fraction of
pixels changed (0..1), so both lie in [0, 1].

Choices, stated once: baseline 0 (the occlusion fill: black for mammograms, the training mean for
MRI); insertion starts from the baseline, not from a blurred copy; only pixels in ``where`` take
part (MRI: brain voxels); ties keep the flat order (stable sort); the probability is the softmax of
the scores the attributions explain (patch logits, full-image class-map maxima, MRI logits).

Written by hand: Captum has neither curve, and Quantus 0.6 has deletion only (``PixelFlipping``),
one unbatched pass per step, with a step that must divide the pixel count; here every curve shares
its end points with the other methods of the same case, and passes are batched.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import auc
from torch import nn

CURVE_STEPS = 10  # coarse: 11 points per curve, 2 x 9 passes per map plus 2 per case
BATCH = 4  # perturbed inputs per forward pass (full mammograms are ~900x600 px)


def pixel_order(relevance: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Flat indices of the pixels in ``where`` (all by default), most relevant first; ties in flat order."""
    flat = relevance.ravel()
    candidates = np.arange(flat.size) if where is None else np.flatnonzero(where.ravel())
    return candidates[np.argsort(-flat[candidates], kind="stable")]


def fractions(steps: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, steps + 1)


class CurveScorer:
    """Deletion / insertion curves of one input and one explained class, for any number of maps."""

    def __init__(self, score_model: nn.Module, inputs: torch.Tensor, target: int, where: np.ndarray | None = None,
                 steps: int = CURVE_STEPS, baseline: float = 0.0) -> None:
        if steps < 1:
            raise ValueError("curves need at least one step")
        self.score_model, self.target, self.steps = score_model, target, steps
        self.inputs = inputs.detach().float().clone()  # (1, 1, *spatial)
        self.where = where
        empty = self.inputs.clone().reshape(-1)
        empty[torch.from_numpy(pixel_order(np.zeros(inputs.shape[2:]), where))] = baseline
        self.empty = empty.reshape(self.inputs.shape)  # every pixel that takes part at the baseline
        self.ends = self.probability(torch.cat([self.inputs, self.empty]))  # (unchanged, all at baseline)

    @torch.no_grad()
    def probability(self, batch: torch.Tensor) -> np.ndarray:
        out = [torch.softmax(self.score_model(batch[i:i + BATCH]).float(), dim=1)[:, self.target]
               for i in range(0, len(batch), BATCH)]
        return torch.cat(out).numpy().astype(np.float64)

    def curves(self, relevance: np.ndarray) -> dict[str, np.ndarray]:
        """{'deletion': p at each fraction deleted, 'insertion': p at each fraction inserted}."""
        if relevance.shape != tuple(self.inputs.shape[2:]):
            raise ValueError(f"map of shape {relevance.shape} does not match the input's {tuple(self.inputs.shape[2:])}")
        order = torch.from_numpy(pixel_order(relevance, self.where))
        cuts = np.round(fractions(self.steps)[1:-1] * len(order)).astype(int)
        source, blank = self.inputs.reshape(-1), self.empty.reshape(-1)
        deleted, inserted = [], []
        for k in cuts:
            d, i = source.clone(), blank.clone()
            d[order[:k]] = blank[order[:k]]
            i[order[:k]] = source[order[:k]]
            deleted.append(d)
            inserted.append(i)
        shape = (-1, *self.inputs.shape[1:])
        p_del = self.probability(torch.stack(deleted).reshape(shape)) if cuts.size else np.empty(0)
        p_ins = self.probability(torch.stack(inserted).reshape(shape)) if cuts.size else np.empty(0)
        full, empty = self.ends
        return {"deletion": np.concatenate([[full], p_del, [empty]]),
                "insertion": np.concatenate([[empty], p_ins, [full]])}

    def aucs(self, relevance: np.ndarray) -> dict[str, float]:
        """{'deletion_auc', 'insertion_auc'} plus the curves themselves."""
        curves = self.curves(relevance)
        x = fractions(self.steps)
        return {"deletion_auc": float(auc(x, curves["deletion"])), "insertion_auc": float(auc(x, curves["insertion"])),
                "deletion_curve": curves["deletion"], "insertion_curve": curves["insertion"]}
