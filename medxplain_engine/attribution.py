"""Attribution methods: one class per method, one ``attribute(ctx, target, options)`` signature.

Captum does the work wherever it has the method (saliency/sensitivity, guided backprop, integrated
gradients, Grad-CAM, occlusion, area occlusion as feature ablation over atlas regions). Written by
hand: CAM from the classifier weights (Captum has no CAM: it is one weighted sum), the 3D
occlusion in ``medxplain_engine/occlusion3d.py`` (Captum's Occlusion cannot skip windows outside the
brain or reuse activations, which makes the seed's stride-12 map ~100x more expensive) and the 2D
one of the DDSM ResNet in ``medxplain_engine/occlusion2d.py`` (Captum's semantics, recomputing only
each window's receptive-field boxes).

Every method explains a scalar score of a (1, 1, *spatial) input tensor:
- mammography: the class logit (patches) or the class map's maximum (full images), with the grey
  image as input, so maps live in image space;
- MRI: the softmax probability of the target class (the seed's choice), with the normalised
  volume as input (0 = training mean, which is also the occlusion fill value).
Maps come back as float32 arrays on the analysed grid (``serialise`` puts them into the sent frame).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import (
    FeatureAblation,
    GuidedBackprop,
    IntegratedGradients,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from torch import nn

from medxplain_contract.errors import InputError
from medxplain_engine.budget import CostInput, TooExpensive
from medxplain_engine.occlusion2d import occlusion_map
from medxplain_engine.options import RequestOptions
from medxplain_models.preprocess import ddsm_normalise

MAX_OCCLUSION_PASSES_2D = 1024


CellGrid = tuple[float, float]  # (input position of cell 0's receptive-field centre, cell spacing), every axis


@dataclass
class ExplainContext:
    score_model: nn.Module  # (1, 1, *spatial) -> (1, classes)
    explained_layer: nn.Module  # inside score_model; Grad-CAM's layer
    inputs: torch.Tensor  # (1, 1, *spatial)
    feature_map: torch.Tensor | None = None  # (units, *fmap_spatial), explained layer activations
    class_weights: torch.Tensor | None = None  # (classes, units) linear read-out (mammography)
    brain_mask: np.ndarray | None = None
    atlas_labels: np.ndarray | None = None
    voxel_mm: float = 1.0  # MRI grid spacing: occlusion defaults are given in mm
    logit_model: nn.Module | None = None  # pre-softmax scores, when score_model is a probability
    atlas_mask: torch.Tensor | None = None  # (1, 1, *spatial) int64 atlas labels on the inputs' device
    explained_grid: CellGrid | None = None  # where explained_layer's cells sit on the input; None = evenly
    feature_grid: CellGrid | None = None  # the same for feature_map

    @property
    def gradcam_model(self) -> nn.Module:
        """Grad-CAM weights come from pre-softmax scores (Selvaraju et al.): a saturated softmax has ~0 gradient."""
        return self.logit_model or self.score_model

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[2:])


def upsample(fmap: torch.Tensor, size: tuple[int, ...], grid: CellGrid | None = None) -> torch.Tensor:
    """(C, *s) -> (C, *size), bilinear / trilinear.

    Without ``grid`` the cells are taken to tile the input evenly (``F.interpolate``, as Captum's
    ``LayerAttribution.interpolate`` does); the ResNet's padded convs keep its cells within half a cell
    of that. With ``grid``, each
    cell's value is placed at its receptive field's centre and interpolated linearly between centres
    (constant beyond the outer ones). Written here because neither torch nor Captum interpolates on a
    grid with an offset; see ``medxplain_models.adni.cell_grid`` for why the 3D CNN needs it.
    """
    if grid is None:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        return F.interpolate(fmap[None].float(), size=size, mode=mode, align_corners=False)[0]
    out = fmap.float()
    for axis, n_out in enumerate(size, start=1):
        weights = _axis_weights(n_out, out.shape[axis], grid, out.device)
        out = torch.movedim(torch.tensordot(out, weights, dims=([axis], [1])), -1, axis)
    return out


def _axis_weights(n_out: int, n_cells: int, grid: CellGrid, device: torch.device) -> torch.Tensor:
    """(n_out, n_cells) linear-interpolation weights from cell centres to output positions."""
    offset, step = grid
    position = ((torch.arange(n_out, device=device, dtype=torch.float32) - offset) / step).clamp(0, n_cells - 1)
    low = position.floor().long().clamp(max=max(n_cells - 2, 0))
    high = (low + 1).clamp(max=n_cells - 1)
    frac = position - low
    weights = torch.zeros(n_out, n_cells, device=device)
    rows = torch.arange(n_out, device=device)
    weights[rows, low] += 1 - frac
    weights[rows, high] += frac
    return weights


def _to_numpy(attr: torch.Tensor) -> np.ndarray:
    return attr.detach().reshape(attr.shape[-len(attr.shape) + 2:]).float().cpu().numpy()


class Attribution(ABC):
    name: str
    description: str
    online: bool = True  # offered on the synchronous REST/gRPC path (within the budget, medxplain_engine/budget.py)
    cost_passes: float = 3.0  # forward-pass equivalents at the analysed size: a forward + a backward (2x)

    @abstractmethod
    def attribute(self, ctx: ExplainContext, target: int, options: RequestOptions) -> np.ndarray: ...

    def passes(self, cost: CostInput, options: RequestOptions) -> float:
        """Declared cost, checked against the budget before the forward pass."""
        return self.cost_passes

    def fitting(self, cost: CostInput, options: RequestOptions, allowed: float) -> str | None:
        """A setting of this method that costs at most ``allowed`` passes, for the too_expensive message."""
        return None


class CAM(Attribution):
    name, description = "cam", "class activation map: sum_u fc.weight[c,u] x layer4 map u, upsampled"
    cost_passes = 0.0  # reuses the forward pass's feature map

    def attribute(self, ctx, target, options):
        assert ctx.feature_map is not None and ctx.class_weights is not None
        cam = torch.einsum("u...,u->...", ctx.feature_map.float(), ctx.class_weights[target].float())
        return upsample(cam[None], ctx.spatial, ctx.feature_grid)[0].cpu().numpy()


class GradCAM(Attribution):
    name = "gradcam"
    description = ("Grad-CAM on a conv block (Captum LayerGradCam, pre-softmax score; gradcam_layer, default the last), "
                   "ReLU, upsampled")
    cost_passes = 2.0  # a forward, and a backward only down to the explained layer

    def passes(self, cost, options):
        return self.cost_passes if options.gradcam_layer is None else 3.0  # an earlier layer: at most a full backward

    def attribute(self, ctx, target, options):
        layer_attr = LayerGradCam(ctx.gradcam_model, ctx.explained_layer).attribute(
            ctx.inputs, target=target, relu_attributions=True)
        return _to_numpy(upsample(layer_attr[0], ctx.spatial, ctx.explained_grid)[None])


class Sensitivity(Attribution):
    """|d score / d x| (the seed's sensitivity analysis; Captum calls it Saliency)."""

    name, description = "sensitivity", "sensitivity analysis |d p / d x| (Captum Saliency)"

    def attribute(self, ctx, target, options):
        return _to_numpy(Saliency(ctx.score_model).attribute(ctx.inputs, target=target, abs=True))


class SaliencyMap(Sensitivity):
    name, description = "saliency", "gradient magnitude |d logit / d x| (Captum Saliency)"


class GuidedBackpropagation(Attribution):
    name, description = "guided_backprop", "guided backprop: gradient with negative gradients clamped at every ReLU"

    def attribute(self, ctx, target, options):
        return _to_numpy(GuidedBackprop(ctx.score_model).attribute(ctx.inputs, target=target))


class IntegratedGrads(Attribution):
    name, description = "integrated_gradients", "integrated gradients from a zero baseline (Captum)"

    def passes(self, cost, options):
        return self.cost_passes * options.ig_steps

    def fitting(self, cost, options, allowed):
        steps = int(allowed // self.cost_passes)
        return f"ig_steps<={steps}" if steps >= 2 else None

    def attribute(self, ctx, target, options):
        ig = IntegratedGradients(ctx.score_model)
        attr = ig.attribute(ctx.inputs, baselines=torch.zeros_like(ctx.inputs), target=target,
                            n_steps=options.ig_steps, internal_batch_size=ig_batch(ctx.inputs, options.ig_steps))
        return _to_numpy(attr)


IG_ELEMENTS_PER_PASS = 2_000_000  # input elements per backward pass of integrated gradients


def ig_batch(inputs: torch.Tensor, steps: int) -> int:
    """Steps per backward pass, bounded by input size: memory grows with depth x pixels x batch, and
    8 steps of a full mammogram through a ResNet-152 took 23 GB (OOM-killed in `make bench`); one step
    at a time keeps it to one forward's activations. Patches still batch 8 steps per pass."""
    return max(1, min(steps, 8, IG_ELEMENTS_PER_PASS // max(1, inputs[0].numel())))


class Occlusion2D(Attribution):
    """Captum's Occlusion semantics; on the DDSM ResNet by incremental inference (medxplain_engine/occlusion2d.py)."""

    name, description = "occlusion", "occlusion: score drop when a square is set to 0 (Captum Occlusion semantics, incremental inference)"

    @staticmethod
    def geometry(spatial: tuple[int, ...], options: RequestOptions) -> tuple[int, int, int]:
        """(size, stride, forward passes); refuses a window larger than the image or too many passes."""
        h, w = spatial
        size = options.occlusion_size or max(8, min(h, w) // 8)
        stride = options.occlusion_stride or max(4, size // 2)
        if size > min(h, w):
            raise InputError("bad_parameter", f"occlusion_size {size} is larger than the analysed image ({w}x{h})")
        passes = ((h - size) // stride + 1) * ((w - size) // stride + 1)
        if passes > MAX_OCCLUSION_PASSES_2D:
            raise TooExpensive("too_expensive", f"occlusion with size {size} / stride {stride} needs {passes} forward "
                             f"passes (limit {MAX_OCCLUSION_PASSES_2D}); raise occlusion_stride or send a patch")
        return size, stride, passes

    def passes(self, cost, options):
        return self.geometry(cost.spatial, options)[2] + 1

    def fitting(self, cost, options, allowed):
        h, w = cost.spatial
        size = self.geometry(cost.spatial, options)[0]
        for stride in range(max(1, options.occlusion_stride or 1), min(h, w) + 1):
            window = max(size, stride)  # past the window size, the window grows with the stride
            if ((h - window) // stride + 1) * ((w - window) // stride + 1) + 1 <= allowed:
                return f"occlusion_stride>={stride} (size {window})"
        return "a 227x227 patch for occlusion"

    def attribute(self, ctx, target, options):
        size, stride, _ = self.geometry(ctx.spatial, options)
        head = getattr(ctx.score_model, "head", None)  # DDSM score models: layer4 map -> scores
        if head is not None:
            return occlusion_map(ctx.score_model.model, head, ddsm_normalise, ctx.inputs, target, size, stride)
        attr = Occlusion(ctx.score_model).attribute(ctx.inputs, sliding_window_shapes=(1, size, size),
                                                   strides=(1, stride, stride), baselines=0, target=target,
                                                   perturbations_per_eval=8)
        return _to_numpy(attr)


class AreaOcclusion(Attribution):
    """Probability drop when a whole atlas region is set to 0 (Captum FeatureAblation over the atlas)."""

    name, description = "area_occlusion", "area occlusion: probability drop per atlas region set to 0, clipped at 0"

    def passes(self, cost, options):
        return cost.n_regions + 1

    def attribute(self, ctx, target, options):
        if ctx.atlas_labels is None:
            raise InputError("unsupported_method", "this model has no atlas; area_occlusion is unavailable")
        mask = ctx.atlas_mask if ctx.atlas_mask is not None else torch.from_numpy(
            ctx.atlas_labels.astype(np.int64))[None, None].to(ctx.inputs.device)
        attr = FeatureAblation(ctx.score_model).attribute(ctx.inputs, baselines=0, target=target,
                                                          feature_mask=mask, perturbations_per_eval=2)
        return np.clip(_to_numpy(attr), 0, None)


class UnitMaps:
    """Per-unit maps of the explained layer, upsampled and normalised together (not an attribution)."""

    @staticmethod
    def compute(ctx: ExplainContext, units: list[int]) -> np.ndarray:
        assert ctx.feature_map is not None
        return upsample(ctx.feature_map[units].float(), ctx.spatial, ctx.feature_grid).cpu().numpy()


DDSM_METHODS: dict[str, Attribution] = {m.name: m for m in (
    CAM(), GradCAM(), SaliencyMap(), GuidedBackpropagation(), IntegratedGrads(), Occlusion2D())}
DDSM_DEFAULT = ("cam",)


def mri_methods() -> dict[str, Attribution]:
    from medxplain_engine.occlusion3d import Occlusion3D

    return {m.name: m for m in (Sensitivity(), GuidedBackpropagation(), Occlusion3D(), AreaOcclusion(), GradCAM(),
                                IntegratedGrads())}


MRI_DEFAULT = ("gradcam",)
