"""The inference engine: decode -> validate -> preprocess -> forward -> units -> attributions -> encode.

TorchServe handlers, the batch job and the tests all call :meth:`Engine.run`, so online and batch
results for the same bytes come from the same code. Nothing here knows about TorchServe.
Shape of a response: ``docs/api.md``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to
from PIL import Image
from torch import nn

from medxplain_contract.decoding import decode_image, decode_volume
from medxplain_contract.encodings import encode_2d, encode_3d
from medxplain_contract.errors import InputError, as_row_error
from medxplain_contract.finite import finite_json
from medxplain_engine.attribution import (
    DDSM_DEFAULT,
    DDSM_METHODS,
    MRI_DEFAULT,
    Attribution,
    ExplainContext,
    UnitMaps,
    mri_methods,
)
from medxplain_engine.budget import Budget, CostInput
from medxplain_engine.features import ItemFeatures, extract_features
from medxplain_engine.options import RequestOptions, parse_options
from medxplain_engine.regions import region_relevance
from medxplain_engine.units import rank_units
from medxplain_models.bundle import ModelBundle, content_digest
from medxplain_models.ddsm import FULL_IMAGE_SHORT_SIDE, PATCH_SIZE
from medxplain_models.decision import decide, image_scores
from medxplain_models.preprocess import ddsm_normalise

log = logging.getLogger(__name__)
API_VERSION = "1"


@dataclass
class EngineRequest:
    """One item of a batch: the file's bytes plus the request parameters."""

    payload: bytes
    params: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A decoded, validated input ready for the forward pass."""

    inputs: torch.Tensor  # (1, 1, *spatial) in the space attributions are computed in
    mode: str  # items with the same mode share a forward pass
    options: RequestOptions
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source_affine: np.ndarray | None = None  # MRI: the sent scan's affine, for maps on its own grid


@dataclass
class Forward:
    """What one item's forward pass left behind for units and attributions."""

    probabilities: np.ndarray
    feature_map: torch.Tensor  # (units, *spatial) of the explained layer
    decision: dict | None = None  # full mammograms: the calibrated image-level decision (its label wins)
    class_map: torch.Tensor | None = None  # full mammograms: (classes, *cells) class-probability map


class Engine(ABC):
    kind: str
    methods: dict[str, Attribution]
    default_methods: tuple[str, ...]

    def __init__(self, bundle: ModelBundle, archive_digest: str) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        for module in self.model.modules():  # in-place ReLUs break Captum's backward hooks
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.archive_digest = archive_digest
        self.budget = Budget()  # batch defaults; the online adapter installs the serving budget

    @staticmethod
    def from_model_dir(model_dir: Path) -> Engine:
        """Load an unpacked archive (TorchServe's model_dir or the batch job's extraction)."""
        model_dir = Path(model_dir)
        bundle = ModelBundle.load(model_dir)
        engine_cls = {"ddsm": DDSMEngine, "adni": ADNIEngine}[bundle.kind]
        return engine_cls(bundle, content_digest(model_dir))

    def model_info(self) -> dict:
        return {"name": self.bundle.name, "version": self.bundle.version, "archive_digest": self.archive_digest,
                "weights_sha256": self.bundle.card.get("weights_sha256")}

    def describe_methods(self) -> dict:
        """Each method's description, cost class and, when the model card has one, its measured quality:
        sanity flag and pointing game per setting from ``python -m model_store evaluate --card``."""
        quality = self.bundle.card.get("explanation_quality", {}).get("methods", {})
        return {name: {"description": m.description, "online": m.online,
                       **({"quality": quality[name]} if name in quality else {})} for name, m in self.methods.items()}

    def describe(self) -> dict:
        """What TorchServe's describe call returns (``GET /models/{name}?customized=true``)."""
        quality = self.bundle.card.get("explanation_quality", {})
        return {"api_version": API_VERSION, "model": self.model_info(), "class_names": list(self.bundle.class_names),
                "default_methods": list(self.default_methods), "methods": self.describe_methods(),
                "quality_source": {k: quality[k] for k in ("split", "limit", "target", "sanity_threshold", "tolerance",
                                                          "settings", "how_to_read") if k in quality}}

    # -- pipeline -------------------------------------------------------------------------------

    def run(self, requests: list[EngineRequest]) -> list[dict | InputError]:
        """One result per request, in order; a bad item yields its error without failing the others."""
        return [r if isinstance(r, InputError) else r[0] for r in self.run_with_features(requests)]

    def run_with_features(self, requests: list[EngineRequest]) -> list[tuple[dict, ItemFeatures] | InputError]:
        """:meth:`run` plus each item's :class:`ItemFeatures` (the batch job's entry: same code path).

        Every stage is isolated per item: whatever one item raises (options, decoding, budgets, the
        batched forward, explaining, encoding) becomes that item's error and the others go on. A
        failed batched forward is retried item by item, so only the guilty item fails.
        """
        results: list[tuple[dict, ItemFeatures] | InputError | None] = [None] * len(requests)
        prepared: dict[int, Prepared] = {}
        for i, req in enumerate(requests):
            stage = "options"
            try:
                options = parse_options(req.params, self.bundle.class_names, self.methods, self.default_methods,
                                        self.model.num_units)
                stage = "decode"
                item = self.prepare(req.payload, options)
                stage = "budget"
                self.check_budget(item)
                prepared[i] = item
            except Exception as err:  # noqa: BLE001 -- one undecodable item must not fail its whole batch
                results[i] = as_row_error(err, stage, log)
        for mode in sorted({p.mode for p in prepared.values()}):
            idx = [i for i, p in prepared.items() if p.mode == mode]
            for i, fwd in self._forward_isolated(mode, idx, prepared, results):
                try:
                    item = prepared[i]
                    response = finite_json(self.respond(item, fwd))
                    results[i] = (response, extract_features(fwd.feature_map, item.inputs, self.peak_window,
                                                             self.unit_class_weights, fwd.class_map))
                except Exception as err:  # noqa: BLE001 -- isolate the item, keep the batch and the worker
                    results[i] = as_row_error(err, "explain", log)
        return results  # type: ignore[return-value]

    def _forward_isolated(self, mode: str, idx: list[int], prepared: dict[int, Prepared],
                          results: list) -> list[tuple[int, Forward]]:
        """The batched forward; if it fails, each item alone, so one bad item cannot fail its neighbours."""
        try:
            return list(zip(idx, self.forward(mode, [prepared[i] for i in idx]), strict=True))
        except Exception as err:  # noqa: BLE001 -- isolated to its row (handlers/errors.as_row_error)
            if len(idx) == 1:
                results[idx[0]] = as_row_error(err, "forward", log)
                return []
            log.warning("batched forward of %d items failed (%s): retrying one by one", len(idx), type(err).__name__)
        out = []
        for i in idx:
            try:
                out.append((i, self.forward(mode, [prepared[i]])[0]))
            except Exception as err:  # noqa: BLE001 -- isolated to its row (handlers/errors.as_row_error)
                results[i] = as_row_error(err, "forward", log)
        return out

    def check_budget(self, item: Prepared) -> None:
        """Explanation cost and response size, before the forward pass (medxplain_engine/budget.py)."""
        options = item.options
        self.budget.check_cost(self.methods, options, self.cost_input(item))
        n_maps = len(options.explain) + (options.top_k if options.unit_maps else 0)
        self.budget.check_response(n_maps, self.output_elements(item), self.map_encoding(options),
                                   self.region_rows(options))

    def cost_input(self, item: Prepared) -> CostInput:
        return CostInput(spatial=tuple(item.inputs.shape[2:]))

    def output_elements(self, item: Prepared) -> int:
        """Elements of one returned map (maps come back on the sent input's grid)."""
        return int(np.prod(item.inputs.shape[2:]))

    def map_encoding(self, options: RequestOptions) -> str:
        return options.encoding

    def region_rows(self, options: RequestOptions) -> int:
        return 0

    def respond(self, item: Prepared, fwd: Forward) -> dict:
        names = self.bundle.class_names
        predicted = int(fwd.decision["label_index"]) if fwd.decision else int(np.argmax(fwd.probabilities))
        target = predicted if item.options.target is None else item.options.target
        ctx = self.explain_context(item, fwd)
        timings: dict[str, float] = {}
        response = {
            "api_version": API_VERSION, "model": self.model_info(),
            "prediction": {"label": names[predicted], "label_index": predicted,
                           "probabilities": {n: float(p) for n, p in zip(names, fwd.probabilities)},
                           **({"decision": fwd.decision} if fwd.decision else {})},
            "target": {"label": names[target], "index": target},
            "input": item.meta,
        }
        if item.options.top_k:
            started = time.perf_counter()
            units = rank_units(*self.unit_scores(ctx, fwd, target), k=item.options.top_k,
                               unit_labels=self.bundle.unit_labels, weight_source=self.weight_source)
            response["units"] = units
            timings["units"] = _ms(started)
            if item.options.unit_maps:
                maps = UnitMaps.compute(ctx, [u["unit"] for u in units])
                response["unit_maps"] = self.encode_maps(item, maps, [str(u["unit"]) for u in units], shared_scale=True)
        if item.options.explain:
            response["heatmaps"] = {}
            for name in item.options.explain:
                started = time.perf_counter()
                relevance = self.methods[name].attribute(ctx, target, item.options)
                timings[name] = _ms(started)
                response["heatmaps"][name] = {"description": self.methods[name].description,
                                              **self._quality(name),
                                              **self.encode_maps(item, relevance[None], [name])[name]}
                self.add_method_extras(response, name, relevance)
        response["timing_ms"] = timings
        response["warnings"] = item.warnings
        return response

    def _quality(self, method: str) -> dict:
        """{'quality': sanity flag and pointing game per setting} from the model card, or nothing."""
        quality = self.bundle.card.get("explanation_quality", {}).get("methods", {}).get(method)
        if not quality:
            return {}
        return {"quality": {setting: {k: q.get(k) for k in ("sanity", "pointing_game")} for setting, q in quality.items()}}

    peak_window: int | None = None  # cells per side of ItemFeatures.peak_maps (2D models)

    @property
    def unit_class_weights(self) -> torch.Tensor | None:
        """(classes, units) weights of a linear classifier on the pooled units, if the model has one."""
        return None

    def add_method_extras(self, response: dict, method: str, relevance: np.ndarray) -> None:
        """Hook for per-method side outputs (the MRI region table)."""

    @property
    @abstractmethod
    def weight_source(self) -> str: ...

    @abstractmethod
    def prepare(self, payload: bytes, options: RequestOptions) -> Prepared: ...

    @abstractmethod
    def forward(self, mode: str, items: list[Prepared]) -> list[Forward]: ...

    @abstractmethod
    def explain_context(self, item: Prepared, fwd: Forward) -> ExplainContext: ...

    @abstractmethod
    def unit_scores(self, ctx: ExplainContext, fwd: Forward, target: int) -> tuple[np.ndarray, np.ndarray]:
        """(activations, weights) per unit for the target class."""

    @abstractmethod
    def encode_maps(self, item: Prepared, maps: np.ndarray, names: list[str], shared_scale: bool = False) -> dict: ...


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# --- mammography ---------------------------------------------------------------------------------

class PatchScore(nn.Module):
    """Grey patch (N, 1, H, W) -> class logits: what attributions explain for patches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.model(ddsm_normalise(grey[:, 0]))


class FullImageScore(PatchScore):
    """Grey full image -> per-class maximum of the class map (DeepMiner's image score, as logits)."""

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.model.class_map(self.model.features(ddsm_normalise(grey[:, 0]))).amax(dim=(2, 3))


class DDSMEngine(Engine):
    kind = "ddsm"
    methods = DDSM_METHODS
    default_methods = DDSM_DEFAULT
    weight_source = "classifier"
    peak_window = 7  # ~ one 227 px patch at layer4's stride of 32 px

    def __init__(self, bundle: ModelBundle, archive_digest: str) -> None:
        super().__init__(bundle, archive_digest)
        self.scores = {"patch": PatchScore(self.model), "full": FullImageScore(self.model)}

    def prepare(self, payload: bytes, options: RequestOptions) -> Prepared:
        image = decode_image(payload)
        h, w = image.pixels.shape
        meta = {"format": image.source_format, "bits": image.bits, "height": h, "width": w}
        if (h, w) == (PATCH_SIZE, PATCH_SIZE):
            return Prepared(torch.from_numpy(image.pixels)[None, None], "patch", options, {**meta, "mode": "patch"})
        scale = FULL_IMAGE_SHORT_SIDE / min(h, w)
        size = (max(PATCH_SIZE, round(w * scale)), max(PATCH_SIZE, round(h * scale)))
        self.budget.check_image(h, w, (size[1], size[0]))  # before the resize allocates it
        resized = np.array(Image.fromarray(image.pixels).resize(size, Image.BILINEAR), dtype=np.float32)
        return Prepared(torch.from_numpy(resized)[None, None], "full", options,
                        {**meta, "mode": "full_image", "analysed_size": [size[1], size[0]]})

    @torch.inference_mode()
    def forward(self, mode: str, items: list[Prepared]) -> list[Forward]:
        if mode == "patch":
            fmap = self.model.features(ddsm_normalise(torch.cat([p.inputs for p in items])[:, 0]))
            probs = torch.softmax(self.model.fc(self.model.pool(fmap)), dim=1).numpy()
            return [Forward(p, f.clone()) for p, f in zip(probs, fmap)]
        out = []
        for item in items:  # full images differ in size: one pass each
            fmap = self.model.features(ddsm_normalise(item.inputs[:, 0]))
            prob_map = torch.softmax(self.model.class_map(fmap), dim=1)[0].flatten(1)  # (classes, positions)
            # The image score per class is the map's maximum (DeepMiner); the reported distribution
            # is the one at the most suspicious position (lowest 'normal' probability).
            where = int(torch.argmin(prob_map[0]))
            class_scores = prob_map.amax(dim=1)
            item.meta["class_scores"] = {n: float(s) for n, s in zip(self.bundle.class_names, class_scores)}
            item.meta["map_shape"] = list(fmap.shape[2:])
            out.append(Forward(prob_map[:, where].numpy(), fmap[0].clone(), self._decide(fmap, class_scores),
                               prob_map.reshape(-1, *fmap.shape[2:]).clone()))
        return out

    @property
    def unit_class_weights(self) -> torch.Tensor:
        return self.model.fc.weight

    def _decide(self, fmap: torch.Tensor, class_scores: torch.Tensor) -> dict | None:
        """Image-level label under the bundle's calibrated operating point (medxplain_models.decision)."""
        decision = self.bundle.decision
        if not decision:
            return None
        scores = class_scores if decision.get("score", "position") == "position" else image_scores(self.model, fmap, decision)
        return decide(scores, decision, self.bundle.class_names)

    def output_elements(self, item: Prepared) -> int:
        return int(item.meta["height"]) * int(item.meta["width"])

    def explain_context(self, item: Prepared, fwd: Forward) -> ExplainContext:
        return ExplainContext(score_model=self.scores[item.mode], explained_layer=self.model.layer4,
                              inputs=item.inputs.clone(), feature_map=fwd.feature_map,
                              class_weights=self.model.fc.weight.detach())

    def unit_scores(self, ctx, fwd, target):
        activations = fwd.feature_map.flatten(1).amax(dim=1).numpy()
        return activations, self.model.fc.weight[target].detach().numpy()

    def encode_maps(self, item, maps, names, shared_scale=False):
        h, w = item.meta["height"], item.meta["width"]
        if maps.shape[1:] != (h, w):  # back from the analysed size to the sent image's pixels
            maps = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize((w, h), Image.BILINEAR)) for m in maps])
        lo, hi = (float(maps.min()), float(maps.max())) if shared_scale else (None, None)
        return {n: encode_2d(m, item.options.encoding, lo, hi) for n, m in zip(names, maps)}


# --- MRI -----------------------------------------------------------------------------------------

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

    def __init__(self, bundle: ModelBundle, archive_digest: str) -> None:
        super().__init__(bundle, archive_digest)
        self.methods = mri_methods()
        self.score = SoftmaxScore(self.model)
        assert bundle.preprocessing is not None, "an MRI bundle carries its normalisation volumes"
        self.prep = bundle.preprocessing

    def prepare(self, payload: bytes, options: RequestOptions) -> Prepared:
        volume = decode_volume(payload)
        prep = self.prep
        warnings = list(volume.warnings)
        on_grid = volume.data.shape == prep.shape and np.allclose(volume.affine, prep.affine, atol=1e-3)
        data = volume.data if on_grid else self._resample(volume.data, volume.affine)
        if not on_grid:
            warnings.append(f"input of shape {list(volume.data.shape)} was resampled onto the model's "
                            f"{list(prep.shape)} template grid (MNI-152); results are only meaningful for scans "
                            "registered to that template; heatmaps are returned on the input's grid")
        meta = {"format": "nifti", "shape": list(volume.data.shape), "resampled": not on_grid,
                "affine": np.round(volume.affine, 6).tolist()}
        return Prepared(torch.from_numpy(prep.normalise(data))[None, None], "volume", options, meta, warnings,
                        source_affine=volume.affine)

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
    def forward(self, mode: str, items: list[Prepared]) -> list[Forward]:
        fmap = self.model.features(torch.cat([p.inputs for p in items]))
        probs = torch.softmax(self.model.head(fmap), dim=1).numpy()
        return [Forward(p, f.clone()) for p, f in zip(probs, fmap)]

    @property
    def voxel_mm(self) -> float:
        return float(np.abs(np.linalg.det(self.prep.affine[:3, :3])) ** (1 / 3))

    def cost_input(self, item: Prepared) -> CostInput:
        atlas = self.bundle.atlas
        return CostInput(spatial=tuple(item.inputs.shape[2:]), brain_mask=self.prep.brain_mask,
                         n_regions=0 if atlas is None else len(atlas.regions), voxel_mm=self.voxel_mm)

    def output_elements(self, item: Prepared) -> int:
        return int(np.prod(item.meta["shape"]))

    def map_encoding(self, options: RequestOptions) -> str:
        return "nifti.gz"

    def region_rows(self, options: RequestOptions) -> int:
        atlas = self.bundle.atlas
        return 0 if atlas is None else len(atlas.regions) * len(options.explain)

    def explain_context(self, item: Prepared, fwd: Forward) -> ExplainContext:
        atlas = self.bundle.atlas
        return ExplainContext(score_model=self.score, logit_model=self.model, explained_layer=self.model.relu_4,
                              inputs=item.inputs.clone(),
                              feature_map=fwd.feature_map, brain_mask=self.prep.brain_mask,
                              atlas_labels=None if atlas is None else atlas.labels,
                              voxel_mm=self.voxel_mm)

    def unit_scores(self, ctx, fwd, target):
        """Grad-CAM weights of the target logit: only the cheap head (pool + dense layers) is differentiated."""
        fmap = fwd.feature_map[None].clone().requires_grad_(True)
        with torch.enable_grad():
            logit = self.model.head(fmap)[0, target]
            (grad,) = torch.autograd.grad(logit, fmap)
        activations = fwd.feature_map.flatten(1).amax(dim=1).numpy()
        return activations, grad[0].flatten(1).mean(dim=1).numpy()

    def add_method_extras(self, response, method, relevance):
        if self.bundle.atlas is not None:
            response.setdefault("regions", {})[method] = region_relevance(
                relevance, self.bundle.atlas.labels, self.bundle.atlas.regions)

    def encode_maps(self, item, maps, names, shared_scale=False):
        affine = self.prep.affine
        if item.meta["resampled"]:  # put the map back on the scan it came from
            source_affine, shape = item.source_affine, tuple(item.meta["shape"])
            maps = np.stack([np.asarray(resample_from_to(nib.Nifti1Image(m, affine), (shape, source_affine),
                                                         order=1).dataobj, dtype=np.float32) for m in maps])
            affine = source_affine
        return {n: encode_3d(m, affine) for n, m in zip(names, maps)}


def _world_box(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ affine.T
    return world[:, :3].min(0), world[:, :3].max(0)
