"""Per-item features of the explained layer that run-level analyses need (computed only when asked).

The online API returns ranked units and maps; a batch run asks ``Engine.run_prepared`` for features and keeps, per item, every
unit's peak activation and where it occurred, so that the unit atlas (top-activating patches per
unit, DeepMiner) and the similarity index can be built after the run without a second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ItemFeatures:
    """Everything is in feature-map cells unless named otherwise."""

    pooled: np.ndarray  # (units,) float32: spatial maximum per unit, the `activation` of the API
    peak: np.ndarray  # (units, ndim) int32: cell of that maximum
    map_shape: tuple[int, ...]  # spatial shape of the explained layer
    cell_size: tuple[float, ...]  # analysed-input pixels (voxels) per cell along each axis
    peak_maps: np.ndarray | None  # ddsm: (units, w, w) float16 window of each unit's map around its peak
    display: np.ndarray  # the analysed input as the model saw it (grey pixels 0..65535 / z-scored volume)
    # ddsm: (classes, units) pooled activation x classifier weight, i.e. every unit's share of each
    # class logit (exact with max pooling), so top units per class need no second pass
    contributions: np.ndarray | None = None
    class_map: np.ndarray | None = None  # ddsm full images: (classes, *cells) class-probability map

    def top_units_per_class(self, class_names: list[str], k: int = 8) -> dict[str, list[dict]]:
        if self.contributions is None:
            return {}
        out = {}
        for name, row in zip(class_names, self.contributions):
            order = np.argsort(-row, kind="stable")[:k]
            out[name] = [{"unit": int(u), "contribution": float(row[u])} for u in order]
        return out

    @property
    def embedding(self) -> np.ndarray:
        """L2-normalised pooled vector: the similarity embedding (fixed per model version)."""
        norm = float(np.linalg.norm(self.pooled))
        return (self.pooled / norm if norm > 0 else self.pooled).astype(np.float32)


def extract_features(feature_map: torch.Tensor, analysed: torch.Tensor, window: int | None,
                     class_weights: torch.Tensor | None = None, class_map: torch.Tensor | None = None) -> ItemFeatures:
    """feature_map (units, *cells); analysed (1, 1, *pixels); window = cells per side of peak_maps (2D only);
    class_weights (classes, units) of a linear classifier on the pooled features, if the model has one.
    Computed on the tensors' device; only the results are copied to the host."""
    fmap = feature_map.detach().float()
    spatial = tuple(fmap.shape[1:])
    flat = fmap.flatten(1)
    pooled, where = flat.max(dim=1)
    peak = np.stack(np.unravel_index(where.cpu().numpy(), spatial), axis=1).astype(np.int32)
    pixels = tuple(analysed.shape[2:])
    cell_size = tuple(p / c for p, c in zip(pixels, spatial))
    peak_maps = None
    if window is not None and len(spatial) == 2:
        # A window x window crop centred on the peak, zero outside the map: the unit's map over
        # the patch the atlas shows. Cut by hand: torchvision's crop works per image, not per unit;
        # one gather for all units (rows r..r+window-1 of the padded map), so a GPU copies once.
        half = window // 2
        padded = torch.nn.functional.pad(fmap, (half, half, half, half))
        offsets = torch.arange(window, device=fmap.device)
        corner = torch.from_numpy(peak.astype(np.int64)).to(fmap.device)
        rows, cols = corner[:, 0, None] + offsets, corner[:, 1, None] + offsets
        units = torch.arange(len(peak), device=fmap.device)[:, None, None]
        peak_maps = padded[units, rows[:, :, None], cols[:, None, :]].cpu().numpy().astype(np.float16)
    contributions = None if class_weights is None else (class_weights.detach().float() * pooled[None]).cpu().numpy()
    return ItemFeatures(pooled.cpu().numpy().astype(np.float32), peak, spatial, cell_size, peak_maps,
                        analysed[0, 0].detach().float().cpu().numpy(), contributions,
                        None if class_map is None else class_map.detach().float().cpu().numpy())
