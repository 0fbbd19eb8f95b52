"""The MRI half of the engine (cnn-interpretability): NIfTI volumes on the MNI-152 template grid.

A volume on the bundle's template grid is analysed as is; any other grid is resampled onto it with
a warning (refused when its field of view does not cover half the template), and maps go back onto
the sent grid. The :class:`Geometry3D` of each item carries both affines, so nothing downstream
guesses a grid.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to
from torch import nn

from medxplain_contract.decoding import decode_volume
from medxplain_contract.encodings import encode_3d
from medxplain_contract.errors import InputError
from medxplain_engine.attribution import MRI_DEFAULT, ExplainContext, mri_methods
from medxplain_engine.budget import CostInput
from medxplain_engine.engine import Engine, Geometry3D, Inference, Prepared
from medxplain_engine.options import RequestOptions
from medxplain_engine.regions import region_relevance
from medxplain_models.adni import EXPLAINED_LAYER, cell_grid
from medxplain_models.bundle import ModelBundle


class SoftmaxScore(nn.Module):
    """Normalised volume -> class probabilities: the seed explains the softmax output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


class ADNIEngine(Engine):
    kind = "adni"
    default_methods = MRI_DEFAULT
    weight_source = "gradcam"
    # Block outputs before their pools, 76 -> 36 -> 10 -> 3 cells along x of the 2 mm grid: the last is the
    # seed's and the units'; an earlier one is finer (its cells sit where medxplain_models.adni.cell_grid says).
    gradcam_layers = ("relu_1", "relu_2", "relu_3", "relu_4")

    def __init__(self, bundle: ModelBundle, archive_digest: str, device: torch.device | str = "cpu",
                 amp: bool = False) -> None:
        super().__init__(bundle, archive_digest, device, amp)
        self.methods = mri_methods()
        self.score = SoftmaxScore(self.model)
        assert bundle.preprocessing is not None, "an MRI bundle carries its normalisation volumes"
        self.prep = bundle.preprocessing
        atlas = bundle.atlas  # area occlusion's feature mask, held once on the engine's device
        self.atlas_mask = None if atlas is None else torch.from_numpy(
            atlas.labels.astype(np.int64))[None, None].to(self.device)

    def decode(self, payload: bytes, options: RequestOptions) -> Prepared:
        volume = decode_volume(payload)
        prep = self.prep
        geometry = Geometry3D(tuple(volume.data.shape), np.asarray(volume.affine, dtype=np.float64),
                              tuple(prep.shape), np.asarray(prep.affine, dtype=np.float64))
        warnings = list(volume.warnings)
        data = self._resample(volume.data, volume.affine) if geometry.resampled else volume.data
        if geometry.resampled:
            warnings.append(f"input of shape {list(volume.data.shape)} was resampled onto the model's "
                            f"{list(prep.shape)} template grid (MNI-152); results are only meaningful for scans "
                            "registered to that template; heatmaps are returned on the input's grid")
        meta = {"format": "dicom" if volume.source else "nifti", "shape": list(volume.data.shape), "resampled": geometry.resampled,
                "affine": np.round(volume.affine, 6).tolist()}
        return Prepared(torch.from_numpy(prep.normalise(data))[None, None], "volume", options, geometry, meta, warnings,
                        source=volume.source)

    def _resample(self, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        if not self._overlaps(data.shape, affine):
            raise InputError("volume_not_placeable",
                             "the volume does not cover the model's template space: register it to MNI-152 first")
        src = nib.Nifti1Image(data, affine)
        return np.asarray(resample_from_to(src, (self.prep.shape, self.prep.affine), order=1).dataobj, dtype=np.float32)

    def _overlaps(self, shape: tuple[int, ...], affine: np.ndarray) -> bool:
        """The input's world bounding box must cover at least half of the template grid's."""
        (a_lo, a_hi), (b_lo, b_hi) = _world_box(shape, affine), _world_box(self.prep.shape, self.prep.affine)
        inter = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None).prod()
        return bool(inter >= 0.5 * (b_hi - b_lo).prod())

    @torch.inference_mode()
    def forward(self, mode: str, items: list[Prepared]) -> list[Inference]:
        fmap = self.model.features(torch.cat([p.inputs for p in items]))
        probs = torch.softmax(self.model.head(fmap), dim=1).float().cpu().numpy()
        return [Inference(p, f.clone(), int(np.argmax(p))) for p, f in zip(probs, fmap)]

    @property
    def voxel_mm(self) -> float:
        return float(np.abs(np.linalg.det(self.prep.affine[:3, :3])) ** (1 / 3))

    def cost_input(self, item: Prepared) -> CostInput:
        atlas = self.bundle.atlas
        return CostInput(spatial=tuple(item.inputs.shape[2:]), brain_mask=self.prep.brain_mask,
                         n_regions=0 if atlas is None else len(atlas.regions), voxel_mm=self.voxel_mm)

    def output_elements(self, item: Prepared) -> int:
        return int(np.prod(item.geometry.shape))

    def map_encoding(self, options: RequestOptions) -> str:
        return "nifti.gz"

    def region_rows(self, options: RequestOptions) -> int:
        atlas = self.bundle.atlas
        return 0 if atlas is None else len(atlas.regions) * len(options.explain)

    def explain_context(self, item: Prepared, inference: Inference) -> ExplainContext:
        atlas = self.bundle.atlas
        return ExplainContext(score_model=self.score, logit_model=self.model, explained_layer=self.explained_layer(item.options),
                              inputs=item.inputs.clone(), feature_map=inference.feature_map,
                              brain_mask=self.prep.brain_mask, atlas_labels=None if atlas is None else atlas.labels,
                              voxel_mm=self.voxel_mm, atlas_mask=self.atlas_mask,
                              explained_grid=cell_grid(self.explained_layer_name(item.options)),
                              feature_grid=cell_grid(EXPLAINED_LAYER))

    def restrict_to_input(self, relevance: np.ndarray) -> np.ndarray:
        """Zero outside the brain mask: the normalised input is 0 there for every scan, so no relevance can
        come from it. Without this, Grad-CAM's upsampled cells put the maximum in the grid's empty corner
        (pointing game 0.06 at relu_4) and gradients mark the zero margin around the brain."""
        return np.where(self.prep.brain_mask, relevance, 0).astype(relevance.dtype, copy=False)

    def unit_scores(self, ctx, inference, target):
        """Grad-CAM weights of the target logit: only the cheap head (pool + dense layers) is differentiated."""
        fmap = inference.feature_map[None].clone().requires_grad_(True)
        with torch.enable_grad():
            logit = self.model.head(fmap)[0, target]
            (grad,) = torch.autograd.grad(logit, fmap)
        activations = inference.feature_map.flatten(1).amax(dim=1).cpu().numpy()
        return activations, grad[0].flatten(1).mean(dim=1).cpu().numpy()

    def region_table(self, relevance: np.ndarray) -> list[dict] | None:
        atlas = self.bundle.atlas
        return None if atlas is None else region_relevance(relevance, atlas.labels, atlas.regions)

    def to_sent_frame(self, item: Prepared, maps: np.ndarray) -> np.ndarray:
        """Maps on the template grid, resampled back onto the scan they came from when it was resampled."""
        geometry = item.geometry
        if not geometry.resampled:
            return maps
        return np.stack([np.asarray(resample_from_to(nib.Nifti1Image(m, geometry.model_affine),
                                                     (geometry.shape, geometry.affine), order=1).dataobj,
                                    dtype=np.float32) for m in maps])

    def encode_sent(self, item, maps, names, shared_scale):
        affine = item.geometry.affine if item.geometry.resampled else item.geometry.model_affine
        return {n: encode_3d(m, affine) for n, m in zip(names, maps)}


def _world_box(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ affine.T
    return world[:, :3].min(0), world[:, :3].max(0)
