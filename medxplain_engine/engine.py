"""The inference engine: public stages prepare -> infer -> explain -> features -> serialise.

Every runtime calls these stages and nothing else: the TorchServe adapter (``handlers/``) and the
batch job (``batch/runner.py``) through :meth:`Engine.run` / :meth:`Engine.run_prepared`,
calibration and evaluation (``model_store/``) stage by stage. So online and batch results for the
same bytes come from the same code, and what evaluation measures is what users get.
The model-specific halves live in ``mammo.py`` (DDSM) and ``mri.py`` (ADNI). Shape of a response:
``docs/api.md`` and ``medxplain_contract/schemas/``.

Stage results are typed (:class:`Prepared`, :class:`Inference`, :class:`Explanation`); geometry
travels with the data: a :class:`Prepared` item carries its :class:`Geometry2D` / :class:`Geometry3D`
(sent size and analysed size, or the sent scan's affine and the model grid's), and ``serialise``
puts maps back into the sent frame from it and reports it as ``input.geometry``.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import nn

from medxplain_contract.dicom_source import DicomSource
from medxplain_contract.errors import InputError, as_row_error
from medxplain_contract.finite import finite_json
from medxplain_engine.attribution import Attribution, ExplainContext, UnitMaps
from medxplain_engine.budget import Budget, CostInput
from medxplain_engine.device import FP32, autocast, precision_label, resolve_device
from medxplain_engine.features import ItemFeatures, extract_features
from medxplain_engine.options import RequestOptions, parse_options
from medxplain_engine.served import served_settings
from medxplain_engine.units import rank_units
from medxplain_engine.version import engine_record
from medxplain_models.bundle import ModelBundle, content_digest

log = logging.getLogger(__name__)
API_VERSION = "1"


# --- stage inputs and results --------------------------------------------------------------------

@dataclass
class EngineRequest:
    """One item of a batch: the file's bytes plus the request parameters."""

    payload: bytes
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Geometry2D:
    """Where a 2D input's pixels are: maps are returned in the sent frame, the network saw ``analysed_size``."""

    size: tuple[int, int]  # (rows, cols) of the image as sent
    analysed_size: tuple[int, int]  # (rows, cols) the network analysed (full images are resized)

    @property
    def scale(self) -> float:
        """Analysed pixels per sent pixel (the same along both axes up to rounding)."""
        return self.analysed_size[0] / self.size[0]

    def to_json(self) -> dict:
        return {"frame": "sent", "size": list(self.size), "analysed_size": list(self.analysed_size),
                "scale": round(self.scale, 9)}


@dataclass(frozen=True)
class Geometry3D:
    """A volume's grid and the model's: maps are returned on the sent grid (``affine``)."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> world (mm) of the volume as sent
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray  # the template grid the network analysed

    @property
    def resampled(self) -> bool:
        return self.shape != self.model_shape or not np.allclose(self.affine, self.model_affine, atol=1e-3)

    def to_json(self) -> dict:
        return {"frame": "sent", "shape": list(self.shape), "affine": np.round(self.affine, 6).tolist(),
                "model_shape": list(self.model_shape), "model_affine": np.round(self.model_affine, 6).tolist()}


Geometry = Geometry2D | Geometry3D


@dataclass
class Prepared:
    """``prepare``'s result: a decoded, validated, budget-checked input ready for the forward pass."""

    inputs: torch.Tensor  # (1, 1, *analysed) in the space attributions are computed in
    mode: str  # items with the same mode share a forward pass ("patch" | "full" | "volume")
    options: RequestOptions
    geometry: Geometry
    meta: dict = field(default_factory=dict)  # reported as the response's ``input`` (format, bits, ...)
    warnings: list[str] = field(default_factory=list)
    timing_ms: dict[str, float] = field(default_factory=dict)  # "prepare"; reported in the response's timing_ms
    source: DicomSource | None = None  # DICOM inputs: the source headers the DICOM outputs attach to (never in JSON)


@dataclass
class Inference:
    """``infer``'s result for one item: the prediction and what units and attributions reuse."""

    probabilities: np.ndarray  # (classes,) the reported distribution
    feature_map: torch.Tensor  # (units, *cells) of the explained layer
    label_index: int  # the calibrated decision's label when the model has one, else the argmax
    decision: dict | None = None  # full mammograms: ``prediction.decision`` (medxplain_models.decision)
    class_scores: dict[str, float] | None = None  # full mammograms: each class's class-map maximum
    class_map: torch.Tensor | None = None  # full mammograms: (classes, *cells) class-probability map
    precision: str = FP32  # "fp16-autocast" / "bf16-autocast" when the forward ran under autocast (``amp``)


@dataclass
class Explanation:
    """``explain``'s result: raw float maps on the analysed grid (``serialise`` encodes them)."""

    target: int
    units: list[dict] = field(default_factory=list)
    unit_maps: np.ndarray | None = None  # (top_k, *analysed) when asked
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (*analysed,) relevance
    regions: dict[str, list[dict]] = field(default_factory=dict)  # MRI: atlas table per method
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    """One item's response (the JSON the API returns) and, when asked, its batch features and DICOM objects."""

    response: dict
    features: ItemFeatures | None = None
    dicom: list[Dataset] | None = None  # the derived DICOM objects (render_dicom), all built or none


@dataclass
class DicomObjects:
    """An ``output=dicom`` request's answer: the derived objects, and the JSON response they render."""

    response: dict
    datasets: list[Dataset]


# --- the engine ----------------------------------------------------------------------------------

class Engine(ABC):
    """One model bound once (like a Captum attribution class); every request goes through the stages."""

    kind: str
    methods: dict[str, Attribution]
    default_methods: tuple[str, ...]
    weight_source: str  # what a unit's ``weight`` is (medxplain_engine/units.py)
    gradcam_layers: tuple[str, ...]  # modules of the model Grad-CAM may explain (``gradcam_layer``), last = default
    peak_window: int | None = None  # cells per side of ItemFeatures.peak_maps (2D models)

    def __init__(self, bundle: ModelBundle, archive_digest: str, device: torch.device | str = "cpu",
                 amp: bool = False) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)  # model, inputs and every stage's tensors live here
        self.amp = amp  # autocast for forward-only items (medxplain_engine/device.py); explanations stay fp32
        self.model = bundle.model.eval().to(self.device)
        for module in self.model.modules():  # in-place ReLUs break Captum's backward hooks
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.archive_digest = archive_digest
        self.engine_record = engine_record()  # hashed at load: the code this process imported
        self.budget = Budget()  # batch defaults; the online adapter installs the serving budget
        self.speedups_applied: dict = {}  # what apply_speed_settings turned on (from_model_dir applies it)

    @staticmethod
    def from_model_dir(model_dir: Path, device: torch.device | str = "cpu", amp: bool = False,
                       settings: dict | None = None) -> Engine:
        """Load an unpacked archive (TorchServe's model_dir or the batch job's extraction) onto ``device``
        ("auto" | "cpu" | "cuda" | "cuda:N"; raises DeviceError for a bad or absent one).

        ``settings`` are the ``handler:`` speed-up keys to apply (:meth:`apply_speed_settings`); None
        means the archive's own model-config without the warm-up, i.e. exactly as served, so every
        in-process caller gets the served results; ``{}`` is eager (a bare bundle has no config: eager).
        """
        from medxplain_engine.mammo import DDSMEngine  # the two halves import this module
        from medxplain_engine.mri import ADNIEngine

        model_dir, device = Path(model_dir), resolve_device(device)
        bundle = ModelBundle.load(model_dir, device)
        engine_cls = {"ddsm": DDSMEngine, "adni": ADNIEngine}[bundle.kind]
        engine = engine_cls(bundle, content_digest(model_dir), device, amp)
        chosen = {**served_settings(model_dir), "warm_up": False} if settings is None else settings
        engine.speedups_applied = engine.apply_speed_settings(chosen)
        return engine

    def apply_speed_settings(self, settings: dict) -> dict:
        """CPU speed-ups named under ``handler:`` (DDSM: ``mammo.DDSMEngine``); none here. Returns what applied."""
        return {}

    # -- description ------------------------------------------------------------------------------

    def model_info(self) -> dict:
        """``model`` of every response: the archive digest identifies weights, configuration and engine code."""
        return {"name": self.bundle.name, "version": self.bundle.version, "archive_digest": self.archive_digest,
                "weights_sha256": self.bundle.card.get("weights_sha256"), "engine": dict(self.engine_record)}

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

    # -- composed runs ----------------------------------------------------------------------------

    def run(self, requests: list[EngineRequest]) -> list[dict | DicomObjects | InputError]:
        """The online path: one response (or its error) per request, in order; ``output=dicom`` rows get
        their :class:`DicomObjects`."""
        results = self.run_prepared([self.prepare_isolated(r) for r in requests])
        return [r if isinstance(r, InputError) else DicomObjects(r.response, r.dicom) if r.dicom is not None
                else r.response for r in results]

    def run_prepared(self, items: list[Prepared | InputError], with_features: bool = False,
                     with_dicom: bool = False) -> list[Result | InputError]:
        """infer -> explain -> serialise (-> features, -> DICOM objects) for prepared items; errors pass through.

        DICOM objects are rendered for ``output=dicom`` items, and with ``with_dicom`` (a batch run's DICOMweb
        sink) for every item that came from DICOM (others get ``Result.dicom = None``).

        Every stage is isolated per item: whatever one item raises becomes that item's error and the
        others go on (``infer`` retries a failed batched forward item by item). Each response's
        ``timing_ms`` gets the stage times (prepare, forward, units, methods, serialise: docs/api.md).
        """
        results: list[Result | InputError] = list(items)  # type: ignore[arg-type]
        ready = [(i, p) for i, p in enumerate(items) if isinstance(p, Prepared)]
        started = time.perf_counter()
        inferences = self.infer([p for _, p in ready])
        forward_ms = _ms(started)  # the batch's forward passes: every item of a dynamic batch shares them
        for (i, item), inference in zip(ready, inferences, strict=True):
            if isinstance(inference, InputError):
                results[i] = inference
                continue
            stage = "explain"
            try:
                explanation = self.explain(item, inference)
                explanation.timing_ms = {**item.timing_ms, "forward": forward_ms, **explanation.timing_ms}
                stage = "serialise"
                started = time.perf_counter()
                response = self.serialise(item, inference, explanation)
                response["timing_ms"]["serialise"] = _ms(started)
                dicom = None
                if item.options.output == "dicom" or (with_dicom and item.source is not None):
                    stage = "dicom"
                    started = time.perf_counter()
                    dicom = self.render_dicom(item, inference, explanation, response)
                    response["timing_ms"]["dicom"] = _ms(started)
                stage = "features"
                results[i] = Result(response, self.features(item, inference) if with_features else None, dicom)
            except Exception as err:  # noqa: BLE001 -- isolate the item, keep the batch and the worker
                results[i] = as_row_error(err, stage, log)
        return results

    def prepare_isolated(self, request: EngineRequest) -> Prepared | InputError:
        """:meth:`prepare`, with any failure turned into the item's error (for callers batching items).

        Unexpected failures while decoding are the input's fault (422), elsewhere the server's (500).
        """
        stage = "options"
        started = time.perf_counter()
        try:
            options = self.options(request.params)
            stage = "decode"
            item = self.decode(request.payload, options)
            item.inputs = item.inputs.to(self.device)  # decoded on the host, analysed on the engine's device
            if options.output == "dicom" and item.source is None:
                raise InputError("dicom_output_needs_dicom_input", "output=dicom needs a DICOM input (a mammogram "
                                 "DICOM file, an MRI DICOM series): derived objects attach to the source study")
            stage = "budget"
            self.check_budget(item)
            item.timing_ms["prepare"] = _ms(started)
            return item
        except Exception as err:  # noqa: BLE001 -- one undecodable item must not fail its whole batch
            return as_row_error(err, stage, log)

    # -- stage 1: prepare -------------------------------------------------------------------------

    def options(self, params: dict) -> RequestOptions:
        """Typed request parameters (strict: unknown names, wrong types and ranges are 400s)."""
        return parse_options(params, self.bundle.class_names, self.methods, self.default_methods,
                             self.model.num_units, self.gradcam_layers)

    def explained_layer_name(self, options: RequestOptions) -> str:
        """Grad-CAM's layer: the request's ``gradcam_layer``, else the last of ``gradcam_layers``."""
        return options.gradcam_layer or self.gradcam_layers[-1]

    def explained_layer(self, options: RequestOptions) -> torch.nn.Module:
        return getattr(self.model, self.explained_layer_name(options))

    def prepare(self, request: EngineRequest) -> Prepared:
        """Bytes + parameters -> a typed input with its geometry, refused before any work if over budget.

        Raises the item's :class:`InputError` (see :meth:`prepare_isolated`).
        """
        prepared = self.prepare_isolated(request)
        if isinstance(prepared, InputError):
            raise prepared
        return prepared

    @abstractmethod
    def decode(self, payload: bytes, options: RequestOptions) -> Prepared:
        """Decode, validate and bring onto the network's input grid (model-specific)."""

    def check_budget(self, item: Prepared) -> None:
        """Explanation cost and response size, before the forward pass (medxplain_engine/budget.py)."""
        options = item.options
        self.budget.check_cost(self.methods, options, self.cost_input(item))
        if options.output == "dicom":  # the objects replace the JSON: unit maps and map encodings are not returned
            self.budget.check_response(len(options.explain), self.output_elements(item), "dicom")
            return
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

    # -- stage 2: infer ---------------------------------------------------------------------------

    def infer(self, items: list[Prepared]) -> list[Inference | InputError]:
        """Forward passes, batched by mode; a failed batch is retried item by item so only the guilty item fails."""
        out: list[Inference | InputError | None] = [None] * len(items)
        for mode, amp in sorted({(p.mode, self.uses_amp(p)) for p in items}):
            idx = [i for i, p in enumerate(items) if p.mode == mode and self.uses_amp(p) == amp]
            try:
                for i, inference in zip(idx, self._forward(mode, [items[i] for i in idx], amp), strict=True):
                    out[i] = inference
                continue
            except Exception as err:  # noqa: BLE001 -- isolated to its row (medxplain_contract/errors.as_row_error)
                if len(idx) == 1:
                    out[idx[0]] = as_row_error(err, "forward", log)
                    continue
                log.warning("batched forward of %d items failed (%s): retrying one by one", len(idx),
                            type(err).__name__)
            for i in idx:
                try:
                    out[i] = self._forward(mode, [items[i]], amp)[0]
                except Exception as err:  # noqa: BLE001 -- isolated to its row
                    out[i] = as_row_error(err, "forward", log)
        return out  # type: ignore[return-value]

    def uses_amp(self, item: Prepared) -> bool:
        """Autocast only the forward-only path: an item asking for heatmaps or unit maps is forwarded in fp32."""
        return self.amp and not item.options.explain and not item.options.unit_maps

    def _forward(self, mode: str, items: list[Prepared], amp: bool) -> list[Inference]:
        """:meth:`forward`, under autocast when ``amp``; what it keeps for later stages is cast back to fp32."""
        if not amp:
            return self.forward(mode, items)
        with autocast(self.device, True):
            inferences = self.forward(mode, items)
        label = precision_label(self.device, True)
        for inference in inferences:
            inference.feature_map = inference.feature_map.float()
            if inference.class_map is not None:
                inference.class_map = inference.class_map.float()
            inference.probabilities = np.asarray(inference.probabilities, dtype=np.float32)
            inference.precision = label
        return inferences

    @abstractmethod
    def forward(self, mode: str, items: list[Prepared]) -> list[Inference]:
        """One forward pass over items of one mode (model-specific); raises for the whole batch."""

    # -- stage 3: explain -------------------------------------------------------------------------

    def explain(self, item: Prepared, inference: Inference, methods: tuple[str, ...] | None = None) -> Explanation:
        """Ranked units, unit maps and attribution maps for the target (the request's, else the prediction).

        ``methods`` overrides the request's ``explain`` list (evaluation explains offline methods too).
        """
        options = item.options
        target = inference.label_index if options.target is None else options.target
        ctx = self.explain_context(item, inference)
        out = Explanation(target=target)
        if options.top_k:
            started = time.perf_counter()
            out.units = rank_units(*self.unit_scores(ctx, inference, target), k=options.top_k,
                                   unit_labels=self.bundle.unit_labels, weight_source=self.weight_source)
            out.timing_ms["units"] = _ms(started)
            if options.unit_maps:
                out.unit_maps = UnitMaps.compute(ctx, [u["unit"] for u in out.units])
        for name in options.explain if methods is None else methods:
            started = time.perf_counter()
            out.heatmaps[name] = self.restrict_to_input(self.methods[name].attribute(ctx, target, options))
            out.timing_ms[name] = _ms(started)
            regions = self.region_table(out.heatmaps[name])
            if regions is not None:
                out.regions[name] = regions
        return out

    def restrict_to_input(self, relevance: np.ndarray) -> np.ndarray:
        """A map on the analysed grid, zero where the model's input carries no information (none here)."""
        return relevance

    @abstractmethod
    def explain_context(self, item: Prepared, inference: Inference) -> ExplainContext:
        """What attribution methods need: the score model, the explained layer, the input (a copy)."""

    @abstractmethod
    def unit_scores(self, ctx: ExplainContext, inference: Inference, target: int) -> tuple[np.ndarray, np.ndarray]:
        """(activations, weights) per unit for the target class."""

    def region_table(self, relevance: np.ndarray) -> list[dict] | None:
        """Per-region relevance (MRI with an atlas); None for models without regions."""
        return None

    # -- stage 4: features (only when asked) ------------------------------------------------------

    def features(self, item: Prepared, inference: Inference) -> ItemFeatures:
        """Per-unit peaks, pooled vector and class contributions for run-level analyses (batch runs ask)."""
        return extract_features(inference.feature_map, item.inputs, self.peak_window, self.unit_class_weights,
                                inference.class_map)

    @property
    def unit_class_weights(self) -> torch.Tensor | None:
        """(classes, units) weights of a linear classifier on the pooled units, if the model has one."""
        return None

    # -- stage 5: serialise -----------------------------------------------------------------------

    def serialise(self, item: Prepared, inference: Inference, explanation: Explanation) -> dict:
        """The JSON response (docs/api.md): maps back in the sent frame, encoded; no NaN anywhere."""
        names = self.bundle.class_names
        predicted, target = inference.label_index, explanation.target
        response = {
            "api_version": API_VERSION, "model": {**self.model_info(), "precision": inference.precision},
            "prediction": {"label": names[predicted], "label_index": predicted,
                           "probabilities": {n: float(p) for n, p in zip(names, inference.probabilities)},
                           **({"decision": inference.decision} if inference.decision else {})},
            "target": {"label": names[target], "index": target},
            "input": {**item.meta, **self.inference_meta(inference), "geometry": item.geometry.to_json()},
        }
        if item.options.top_k:
            response["units"] = explanation.units
            if explanation.unit_maps is not None:
                response["unit_maps"] = self.encode_maps(item, explanation.unit_maps,
                                                         [str(u["unit"]) for u in explanation.units], shared_scale=True)
        if item.options.explain:
            response["heatmaps"] = {}
            for name, relevance in explanation.heatmaps.items():
                layer = {"layer": self.explained_layer_name(item.options)} if name == "gradcam" else {}
                response["heatmaps"][name] = {"description": self.methods[name].description, **layer, **self._quality(name),
                                              **self.encode_maps(item, relevance[None], [name])[name]}
            if explanation.regions:
                response["regions"] = explanation.regions
        response["timing_ms"] = explanation.timing_ms
        response["warnings"] = item.warnings
        return finite_json(response)

    # -- stage 6: DICOM objects (only when asked) ---------------------------------------------------

    def render_dicom(self, item: Prepared, inference: Inference, explanation: Explanation,
                     response: dict) -> list[Dataset]:
        """The item's derived DICOM objects (``medxplain_dicom``): a TID 1500 SR of the response, and per heatmap
        a float Parametric Map and an RGB overlay on the source's grid; all built, or an error and none."""
        from medxplain_dicom.render import Algorithm, render_objects

        if item.source is None:
            raise InputError("dicom_output_needs_dicom_input", "DICOM outputs need a DICOM input")
        maps = {name: np.asarray(self.to_sent_frame(item, relevance[None])[0], dtype=np.float32)
                for name, relevance in explanation.heatmaps.items()}
        algorithm = Algorithm(name=self.bundle.name, version=str(self.bundle.version),
                              archive_digest=self.archive_digest, engine_version=str(self.engine_record["version"]))
        return render_objects(response, item.source, maps, algorithm, request_key(item.options))

    def inference_meta(self, inference: Inference) -> dict:
        """What the forward pass adds to the response's ``input`` (full mammograms: class scores, map shape)."""
        return {}

    def encode_maps(self, item: Prepared, maps: np.ndarray, names: list[str], shared_scale: bool = False) -> dict:
        """Maps (n, *analysed) -> {name: encoded map in the sent frame} (medxplain_contract/encodings.py)."""
        return self.encode_sent(item, self.to_sent_frame(item, maps), names, shared_scale)

    @abstractmethod
    def to_sent_frame(self, item: Prepared, maps: np.ndarray) -> np.ndarray:
        """(n, *analysed) -> (n, *sent) using the item's geometry."""

    @abstractmethod
    def encode_sent(self, item: Prepared, maps: np.ndarray, names: list[str], shared_scale: bool) -> dict: ...

    def _quality(self, method: str) -> dict:
        """{'quality': sanity flag and pointing game per setting} from the model card, or nothing."""
        quality = self.bundle.card.get("explanation_quality", {}).get("methods", {}).get(method)
        if not quality:
            return {}
        return {"quality": {setting: {k: q.get(k) for k in ("sanity", "pointing_game")} for setting, q in quality.items()}}


def request_key(options: RequestOptions) -> str:
    """The options that shape a result, canonically: part of the derived objects' deterministic UIDs, so the
    same input, archive and options give the same UIDs (a STOW re-run stores nothing new)."""
    fields = {k: v for k, v in sorted(asdict(options).items()) if k != "output"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=list)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
