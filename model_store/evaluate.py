"""Explanation quality measured against the synthetic data's ground-truth masks.

Definitions: ``/work/shared/notes/explanation-quality.md`` (pointing game, relevance mass and rank
accuracy, Adebayo et al.'s model-randomisation check; for the MRI model also the seed paper's region
ranking and distances between methods' mean maps). Maps come from the serving engine's own
public stages (prepare -> infer -> explain), as raw float maps rather than
the 8-bit encodings a client receives, so ties from quantisation cannot blur ranks.

Choices that are not in the definitions, stated once here and repeated in the report:
- the explained class is the ground-truth class (lesion class / AD), not the prediction;
- ties at the maximum (occlusion maps are blocky) count as the fraction of tied pixels that hit,
  ties at the K-th relevance as their expected share under random tie-breaking;
- a map with no positive relevance has mass accuracy 0; a constant map has Spearman correlation 0;
- randomisation re-initialises (``reset_parameters``, seeded) every parameterised top-level module
  from the output down; BatchNorm layers get fresh affine parameters and running statistics;
- MRI correlations use brain voxels only (outside the brain several methods are 0 for every model,
  which would inflate the correlation); region rankings and distances average per-subject maps
  clipped at 0 and normalised to sum 1;
- deletion / insertion curves (``model_store.faithfulness``) run on the analysed grid (the map
  before it is resized to the sent image), for the trained model only; their chance row is a
  seeded random pixel order.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from medxplain_contract.errors import InputError
from medxplain_engine.attribution import ExplainContext
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_engine.regions import region_relevance
from medxplain_models.localisation import (
    DDSM_TOLERANCE_PX,
    MRI_TOLERANCE_VOXELS,
    dilate,
    mass_accuracy,
    normalised_positive,
    pairwise_l2,
    pointing_game,
    rank_accuracy,
    spearman,
)
from medxplain_models.tiling import PATCH_SIZE, Tile, extract_patch
from model_store.faithfulness import CURVE_STEPS, CurveScorer

SANITY_THRESHOLD = 0.5
POINTING_BAR = 0.9
TOP_REGIONS = 10
# Minutes per full mammogram on 2 cores: evaluated on lesion patches unless named in --methods.
DDSM_EXPENSIVE = ("integrated_gradients", "occlusion")
OCCLUSION_DEFAULTS = {"ddsm": "engine default (window 1/8 of the shorter side, stride half of it, fill 0)",
                      "adni": "engine default (the seed's 40 / 12 mm cube / stride in voxels of the model grid)"}


# --- model randomisation -------------------------------------------------------------------------

def cascade(model: torch.nn.Module) -> list[str]:
    """Top-level modules holding parameters, output first: the order Adebayo et al. randomise in."""
    return [name for name, child in model.named_children() if next(child.parameters(), None) is not None][::-1]


def randomised_engine(engine: Engine, depth: int, seed: int = 0) -> Engine:
    """A copy of ``engine`` whose top ``depth`` cascade modules are re-initialised (nothing written).

    One seed for every depth keeps the cascade nested: the layers randomised at depth d get the same
    random weights at depth d + 1.
    """
    bundle = copy.deepcopy(engine.bundle)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name in cascade(bundle.model)[:depth]:
            for module in getattr(bundle.model, name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return type(engine)(bundle, engine.archive_digest)


def randomisation_depths(n_modules: int, full_cascade: bool) -> list[int]:
    """Top layer and fully randomised, or every step in between with ``full_cascade``."""
    return list(range(1, n_modules + 1)) if full_cascade else sorted({1, n_modules})


# --- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    """One held-out input with a non-empty ground-truth mask on the grid of the sent input."""

    case_id: str
    payload: bytes
    mask: np.ndarray
    target: int


def _rows(data_dir: Path, index: str, split: str) -> list[dict]:
    with open(data_dir / index, newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _limited(rows: list[dict], limit: int | None) -> list[dict]:
    return rows if limit is None else rows[:limit]


def ddsm_cases(data_dir: Path, split: str, limit: int | None = None) -> list[Case]:
    """Lesion images (benign/malignant) of the split as full mammograms; target = the image's label."""
    rows = _limited([r for r in _rows(data_dir, "images.csv", split) if int(r["label"]) > 0], limit)
    return [Case(r["image_id"], (data_dir / r["path"]).read_bytes(),
                 np.asarray(Image.open(data_dir / r["mask_path"])) > 0, int(r["label"])) for r in rows]


def lesion_patch(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 227x227 patch at the model's scale holding the largest lesion, shifted randomly off centre.

    The tile side is a quarter of the shorter image side, as in training; the shift (up to a quarter
    tile per axis) keeps a centre-biased map from winning the pointing game for free.
    """
    components, _ = ndimage.label(mask)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    ys, xs = np.nonzero(components == largest)
    side = min(image.shape) // 4
    shift = rng.integers(-side // 4, side // 4 + 1, size=2)
    y, x = (int(np.clip((lo + hi) // 2 - side // 2 + s, 0, n - side))
            for lo, hi, s, n in zip((ys.min(), xs.min()), (ys.max(), xs.max()), shift, image.shape))
    tile = Tile(y, x, side)
    patch_mask = Image.fromarray(mask[y:y + side, x:x + side].astype(np.uint8)).resize((PATCH_SIZE,) * 2,
                                                                                     Image.NEAREST)
    return extract_patch(image, tile), np.asarray(patch_mask) > 0


def _png16(grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(grey * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def ddsm_patch_cases(data_dir: Path, split: str, limit: int | None = None, seed: int = 0) -> list[Case]:
    """The same lesion images cut to one lesion patch each, sent as 16-bit PNG (the engine's patch mode)."""
    rng = np.random.default_rng(seed)
    cases = []
    for case in ddsm_cases(data_dir, split, limit):
        image = np.asarray(Image.open(io.BytesIO(case.payload))).astype(np.uint16)
        patch, mask = lesion_patch(image, case.mask, rng)
        if mask.any():
            cases.append(Case(case.case_id, _png16(patch), mask, case.target))
    return cases


def adni_cases(data_dir: Path, split: str, limit: int | None = None) -> list[Case]:
    """AD subjects of the split with a non-empty atrophy mask; target = AD (label 1)."""
    rows = _limited([r for r in _rows(data_dir, "subjects.csv", split) if int(r["label"]) == 1], limit)
    cases = [Case(r["subject_id"], (data_dir / r["path"]).read_bytes(),
                  np.asarray(nib.load(data_dir / r["mask_path"]).dataobj) > 0, 1) for r in rows]
    return [c for c in cases if c.mask.any()]


# --- maps from the engine ------------------------------------------------------------------------

def engine_maps(engine: Engine, case: Case, methods: Sequence[str], params: dict) -> tuple[dict[str, np.ndarray], int]:
    """Raw relevance maps on the mask's grid plus the predicted class, through the serving pipeline."""
    maps, predicted, _, _ = engine_maps_in_context(engine, case, methods, params)
    return maps, predicted


def engine_maps_in_context(engine: Engine, case: Case, methods: Sequence[str],
                           params: dict) -> tuple[dict[str, np.ndarray], int, dict[str, np.ndarray], ExplainContext]:
    """:func:`engine_maps` plus the maps on the analysed grid and the context (what the curves perturb).

    The engine's public stages: prepare -> infer -> explain; the predicted class is the one users get
    (the calibrated decision for full mammograms), and maps go back to the sent frame as ``serialise``
    puts them.
    """
    item = engine.prepare(EngineRequest(case.payload, {**params, "target": case.target, "top_k": 0}))
    (inference,) = engine.infer([item])
    if isinstance(inference, InputError):
        raise inference
    raw = engine.explain(item, inference, methods=tuple(methods)).heatmaps
    maps = {m: _on_grid(engine.to_sent_frame(item, r[None])[0], case.mask.shape) for m, r in raw.items()}
    return maps, inference.label_index, raw, engine.explain_context(item, inference)


def _on_grid(relevance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The map in the sent frame must be on the mask's grid (the synthetic masks are drawn on the sent image)."""
    if relevance.shape != shape:
        raise ValueError(f"map of shape {relevance.shape} does not match the mask's {shape}")
    return relevance


# --- runner --------------------------------------------------------------------------------------

@dataclass
class Setting:
    """One table of the report: a set of cases, the methods run on them and how they are scored."""

    name: str
    description: str
    cases: list[Case]
    methods: tuple[str, ...]
    tolerance: float
    tolerance_unit: str
    spearman_where: np.ndarray | None = None  # None: every pixel
    spearman_domain: str = "all pixels"
    region_ranking: bool = False
    planted_regions: tuple[str, ...] = ()  # atlas base names the generator planted atrophy in (dataset.json)


@dataclass
class _Tally:
    """Per-case scores of one method (localisation, and correlation per randomisation stage), averaged at the end."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    correlations: dict[str, list[float]] = field(default_factory=dict)
    curves: dict[str, list[np.ndarray]] = field(default_factory=dict)
    mean_map: np.ndarray | None = None

    def add(self, key: str, value: float) -> None:
        self.scores.setdefault(key, []).append(value)

    def add_curves(self, faith: dict) -> None:
        """Deletion / insertion AUCs of one case, and its curves for the mean curve."""
        self.add("deletion_auc", faith["deletion_auc"])
        self.add("insertion_auc", faith["insertion_auc"])
        for kind in ("deletion", "insertion"):
            self.curves.setdefault(kind, []).append(faith[f"{kind}_curve"])

    def summary(self, threshold: float) -> dict:
        rho = {stage: float(np.mean(v)) for stage, v in self.correlations.items()}
        result: dict = {k: float(np.mean(v)) for k, v in self.scores.items()}
        if self.curves:  # mean probability per fraction of pixels changed
            result["curves"] = {k: np.mean(v, axis=0).round(4).tolist() for k, v in self.curves.items()}
        if rho:  # stages run from the top layer to the fully randomised model
            values = list(rho.values())
            result.update(randomisation_spearman=rho, sanity=sanity_flag(values[0], values[-1], threshold))
        return result


PLANTED = "planted atrophy (mask)"


def evaluate_setting(trained: Engine, randomised: dict[str, Engine], setting: Setting, params: dict,
                     threshold: float = SANITY_THRESHOLD, progress: bool = True, curve_steps: int = CURVE_STEPS,
                     seed: int = 0) -> dict:
    """Score every method of the setting on every case; correlations against each randomised engine.

    ``curve_steps`` > 0 adds deletion / insertion curves of the trained model's maps (0 skips them).
    """
    tallies = {m: _Tally() for m in setting.methods}
    chance, planted, correct, started = _Tally(), _Tally(), 0, time.monotonic()
    rng = np.random.default_rng(seed)
    bar = tqdm(total=len(setting.cases) * (1 + len(randomised)), desc=f"{trained.kind} {setting.name}",
               unit="pass", disable=not progress)
    for case in setting.cases:
        maps, predicted, raw, ctx = engine_maps_in_context(trained, case, setting.methods, params)
        correct += predicted == case.target
        _score_chance(chance, case.mask, setting.tolerance)
        if setting.region_ranking:  # the ground truth ranked like a map: where the atrophy was planted
            _score_localisation(planted, case.mask.astype(np.float32), case.mask, setting.tolerance, True)
        for method, relevance in maps.items():
            _score_localisation(tallies[method], relevance, case.mask, setting.tolerance, setting.region_ranking)
        if curve_steps:
            scorer = CurveScorer(ctx.gradcam_model, ctx.inputs, case.target, ctx.brain_mask, curve_steps)
            for method, relevance in raw.items():
                tallies[method].add_curves(scorer.aucs(relevance))
            chance.add_curves(scorer.aucs(rng.random(ctx.spatial)))  # a random pixel order
        bar.update()
        for stage, engine in randomised.items():
            random_maps, _ = engine_maps(engine, case, setting.methods, params)
            bar.update()
            for method, relevance in random_maps.items():
                rho = spearman(maps[method], relevance, setting.spearman_where)
                tallies[method].correlations.setdefault(stage, []).append(rho)
    bar.close()
    result = {"description": setting.description, "cases": len(setting.cases),
              "case_ids": [c.case_id for c in setting.cases],
              "tolerance": setting.tolerance, "tolerance_unit": setting.tolerance_unit,
              "spearman_domain": setting.spearman_domain, "seconds": round(time.monotonic() - started),
              "accuracy": correct / len(setting.cases), "chance": chance.summary(threshold),
              "methods": {m: t.summary(threshold) for m, t in tallies.items()}}
    result["best"] = _best(result["methods"])
    if setting.region_ranking:
        result.update(_region_report(trained, {**tallies, PLANTED: planted}, len(setting.cases),
                                     setting.planted_regions))
    if curve_steps:
        result["curves"] = {"steps": curve_steps, "fractions": np.linspace(0, 1, curve_steps + 1).round(4).tolist(),
                            "chance": "a seeded random pixel order"}
    return result


def _score_chance(chance: _Tally, mask: np.ndarray, tolerance: float) -> None:
    """What a uniform map scores: the (dilated) mask's share of the image."""
    chance.add("pointing_game", float(dilate(mask, tolerance).mean()))
    chance.add("mass_accuracy", float(mask.mean()))
    chance.add("rank_accuracy", float(mask.mean()))


def _score_localisation(tally: _Tally, relevance: np.ndarray, mask: np.ndarray, tolerance: float,
                        keep_mean_map: bool) -> None:
    tally.add("pointing_game", pointing_game(relevance, mask, tolerance))
    tally.add("mass_accuracy", mass_accuracy(relevance, mask))
    tally.add("rank_accuracy", rank_accuracy(relevance, mask))
    if keep_mean_map:
        normalised = normalised_positive(relevance)
        tally.mean_map = normalised if tally.mean_map is None else tally.mean_map + normalised


def sanity_flag(top: float, full: float, threshold: float = SANITY_THRESHOLD) -> str:
    """'fail' if the map survives full randomisation; a top-layer-only survivor is flagged separately."""
    if full > threshold:
        return "fail"
    return "top-layer insensitive" if top > threshold else "ok"


def _best(methods: dict[str, dict]) -> dict:
    name = max(methods, key=lambda m: methods[m]["pointing_game"])
    score = methods[name]["pointing_game"]
    return {"method": name, "pointing_game": score, "bar": POINTING_BAR, "meets_bar": score >= POINTING_BAR}


def _region_report(engine: Engine, tallies: dict[str, _Tally], n_cases: int, planted: tuple[str, ...] = ()) -> dict:
    """The seed paper's MRI summaries over the mean (sum-1 normalised) map of each method, and of the
    atrophy masks (``PLANTED``: which regions hold the planted loss, as ranked the same way)."""
    mean_maps = {m: t.mean_map / n_cases for m, t in tallies.items() if t.mean_map is not None}
    atlas = engine.bundle.atlas
    tables = {m: region_relevance(v, atlas.labels, atlas.regions) for m, v in mean_maps.items()} if atlas else {}
    # The seed ranked by summed relevance, which favours big labels: our nearest-ellipsoid atlas gives
    # every unassigned voxel (78 % of the brain) to some region, so e.g. "Brainstem" is 4x a real
    # brainstem. Relevance per voxel over the brain's mean ("enrichment", 1 = a uniform map) ranks
    # what a map concentrates on, whatever the label's size.
    brain_voxels = sum(row["voxels"] for row in next(iter(tables.values()), []))
    by_density = {m: [{**row, "enrichment": row["per_voxel"] * brain_voxels}
                      for row in sorted(rows, key=lambda row: -row["per_voxel"])[:TOP_REGIONS]]
                  for m, rows in tables.items()}
    by_sum = {m: rows[:TOP_REGIONS] for m, rows in tables.items()}

    def first(rows: list[dict]) -> dict:
        name = rows[0]["name"] if rows else None
        base = name.removesuffix("_L").removesuffix("_R") if name else None
        return {"name": name, "planted": base in planted} if planted else {"name": name}

    return {"regions": by_sum, "regions_by_density": by_density,
            "first_region": {m: {"by_sum": first(by_sum[m]), "by_density": first(by_density[m])} for m in tables},
            "planted_regions": list(planted),
            "method_distances": {"metric": "l2", "values": pairwise_l2(mean_maps)}}


# --- whole evaluation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    limit: int | None = None
    methods: tuple[str, ...] | None = None  # full images / volumes; None = the model's default set
    patch_methods: tuple[str, ...] | None = None  # ddsm lesion patches; None = all, () = skip
    full_cascade: bool = False
    ig_steps: int = 16
    occlusion_size: int | None = None
    occlusion_stride: int | None = None
    threshold: float = SANITY_THRESHOLD
    seed: int = 0
    progress: bool = True
    curve_steps: int = CURVE_STEPS  # deletion / insertion; 0 = skip
    gradcam_layer: str | None = None  # the engine's default (its last conv block) when None


def evaluate(kind: str, bundle_dir: Path, data_dir: Path, config: EvalConfig = EvalConfig()) -> dict:
    """Load the bundle into the serving engine, build the randomised copies and score every setting."""
    engine = Engine.from_model_dir(bundle_dir)
    if engine.kind != kind:
        raise ValueError(f"{bundle_dir} holds a {engine.kind!r} model, not {kind!r}")
    params = {"ig_steps": config.ig_steps, "occlusion_size": config.occlusion_size,
              "occlusion_stride": config.occlusion_stride, "gradcam_layer": config.gradcam_layer}
    settings = list(_settings(engine, Path(data_dir), config))
    if not any(s.cases for s in settings):
        raise ValueError(f"{data_dir}: no {config.split} cases with a ground-truth mask")
    modules = cascade(engine.model)
    depths = randomisation_depths(len(modules), config.full_cascade)
    randomised = {modules[d - 1]: randomised_engine(engine, d, config.seed) for d in depths}
    return {
        "model": {"kind": kind, **engine.model_info()},
        "settings": {"split": config.split, "limit": config.limit, "target": "ground-truth class",
                     "ig_steps": config.ig_steps, "occlusion_size": config.occlusion_size,
                     "occlusion_stride": config.occlusion_stride, "sanity_threshold": config.threshold,
                     "gradcam_layer": config.gradcam_layer or engine.gradcam_layers[-1],
                     "curves": {"steps": config.curve_steps, "baseline": 0.0,
                                "score": "softmax of the explained scores, explained class",
                                "domain": "analysed grid (MRI: brain voxels)"},
                     "randomisation": {"cascade": modules, "stages": list(randomised), "top": modules[0],
                                       "full": modules[-1], "seed": config.seed,
                                       "init": "reset_parameters() of every module, output side first"}},
        "evaluations": {s.name: evaluate_setting(engine, randomised, s, params, config.threshold, config.progress,
                                                 config.curve_steps, config.seed)
                        for s in settings if s.cases and s.methods},
    }


def _settings(engine: Engine, data_dir: Path, config: EvalConfig) -> Iterable[Setting]:
    available = tuple(engine.methods)
    split, limit = config.split, config.limit
    if engine.kind == "adni":
        methods = _checked(available if config.methods is None else config.methods, available)
        yield Setting("volume", "AD subjects, whole volumes on the model grid", adni_cases(data_dir, split, limit),
                      methods, MRI_TOLERANCE_VOXELS, "voxels", spearman_where=engine.bundle.preprocessing.brain_mask,
                      spearman_domain="brain voxels", region_ranking=True, planted_regions=_planted(data_dir))
        return
    cheap = tuple(m for m in available if m not in DDSM_EXPENSIVE)
    methods = _checked(cheap if config.methods is None else config.methods, available)
    yield Setting("full_image", "lesion images, full mammograms (maps at the sent image's size)",
                  ddsm_cases(data_dir, split, limit), methods, DDSM_TOLERANCE_PX, "px")
    patch_methods = _checked(available if config.patch_methods is None else config.patch_methods, available)
    if patch_methods:
        yield Setting("patch", "the same lesion images cut to one 227x227 patch at the model's scale holding the "
                      "largest lesion, shifted off centre by up to a quarter tile",
                      ddsm_patch_cases(data_dir, split, limit, config.seed), patch_methods, DDSM_TOLERANCE_PX, "px")


def _planted(data_dir: Path) -> tuple[str, ...]:
    """The regions the synthetic generator planted atrophy in (none for data without a manifest)."""
    manifest = data_dir / "dataset.json"
    return tuple(json.loads(manifest.read_text()).get("atrophy_regions", ())) if manifest.is_file() else ()


def _checked(methods: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {sorted(available)}")
    return tuple(methods)


# --- markdown ------------------------------------------------------------------------------------

def to_markdown(report: dict) -> str:
    """The report as markdown: settings, one table per evaluation, MRI regions and distances."""
    model, settings = report["model"], report["settings"]
    lines = [f"## {model['kind']}: explanation quality", "", *_settings_lines(model, settings), ""]
    for name, result in report["evaluations"].items():
        lines += _evaluation_lines(name, result, settings["randomisation"])
    return "\n".join(lines).rstrip() + "\n"


def _settings_lines(model: dict, settings: dict) -> list[str]:
    rnd = settings["randomisation"]
    size, stride = settings["occlusion_size"], settings["occlusion_stride"]
    occlusion = (OCCLUSION_DEFAULTS[model["kind"]] if size is None and stride is None
                 else f"size {size or 'default'} / stride {stride or 'default'} (pixels or voxels of the analysed grid)")
    return [
        f"- model: `{model['name']}` version {model['version']}, weights sha256 `{model['weights_sha256']}`",
        (f"- cases: split `{settings['split']}`, limit {settings['limit'] or 'none'}; "
         f"explained class: {settings['target']}"),
        (f"- integrated gradients: {settings['ig_steps']} steps; occlusion size / stride: {occlusion}; "
         f"Grad-CAM layer `{settings.get('gradcam_layer', 'default')}`"),
        (f"- randomisation: {rnd['init']} (seed {rnd['seed']}); top layer = `{rnd['top']}`, full = down to "
         f"`{rnd['full']}`; ρ = Spearman rank correlation between the trained and the randomised model's map, "
         f"per case, averaged; flag `fail` = ρ full above {settings['sanity_threshold']}, `top-layer insensitive` = "
         "only ρ top layer above it"),
        ("- metrics: pointing game with the mask dilated by the tolerance (tied maxima score the fraction inside); "
         "mass accuracy = positive relevance inside / all positive relevance; rank accuracy over the top K = "
         "mask-size pixels (ties at the cut pro rata); chance row = scores of a uniform map"),
        _curve_line(settings.get("curves", {})),
    ]


def _curve_line(curves: dict) -> str:
    if not curves.get("steps"):
        return "- deletion / insertion curves: not computed (`--curve-steps 0`)"
    return (f"- deletion / insertion (Petsiuk et al. 2018): the most relevant pixels set to {curves['baseline']:g} "
            f"(deletion) or restored onto an all-{curves['baseline']:g} input (insertion) in {curves['steps']} equal "
            f"steps, on the {curves['domain']}; AUC of the {curves['score']} over the fraction changed "
            "(deletion: lower is better, insertion: higher); chance row = a random pixel order")


def _evaluation_lines(name: str, result: dict, rnd: dict) -> list[str]:
    top, full = rnd["top"], rnd["full"]
    best, chance = result["best"], result["chance"]
    lines = [
        f"### {name}", "",
        (f"{result['description']}; {result['cases']} cases; pointing-game tolerance {result['tolerance']:g} "
         f"{result['tolerance_unit']}; ρ over {result['spearman_domain']}; prediction accuracy on these cases "
         f"{result['accuracy']:.2f}; {result['seconds']} s."), "",
        (f"| method | pointing game | mass accuracy | rank accuracy | deletion AUC ↓ | insertion AUC ↑ "
         f"| ρ top layer (`{top}`) | ρ full | flag |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in result["methods"].items():
        rho = r["randomisation_spearman"]
        lines.append(f"| {method} | {r['pointing_game']:.2f} | {r['mass_accuracy']:.3f} | {r['rank_accuracy']:.3f} "
                     f"| {_num(r.get('deletion_auc'))} | {_num(r.get('insertion_auc'))} "
                     f"| {rho[top]:.2f} | {rho[full]:.2f} | {r['sanity']} |")
    lines += [
        (f"| chance (uniform map; random order for the curves) | {chance['pointing_game']:.2f} "
         f"| {chance['mass_accuracy']:.3f} | {chance['rank_accuracy']:.3f} | {_num(chance.get('deletion_auc'))} "
         f"| {_num(chance.get('insertion_auc'))} | | | |"), "",
        (f"Best pointing game: `{best['method']}` {best['pointing_game']:.2f} "
         f"(bar {best['bar']}: {'met' if best['meets_bar'] else 'NOT met'})."), "",
    ]
    if result.get("regions"):
        lines += _region_lines(result["regions"], f"Top {TOP_REGIONS} atlas regions by summed relevance of the mean "
                               "map (each subject's map clipped at 0 and normalised to sum 1; value = share of all "
                               "relevance):", lambda row: f"{row['sum']:.3f}")
    if result.get("regions_by_density"):
        lines += _region_lines(result["regions_by_density"], f"Top {TOP_REGIONS} atlas regions by relevance per voxel "
                               "of the same mean maps (value = enrichment: relevance per voxel over the brain's mean, "
                               "1 = a uniform map):", lambda row: f"{row['enrichment']:.1f}")
    if result.get("planted_regions"):
        lines += _first_region_lines(result["first_region"], result["planted_regions"])
    if "method_distances" in result:
        lines += _distance_lines(result["method_distances"])
    return lines


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _first_region_lines(first: dict[str, dict], planted: list[str]) -> list[str]:
    def cell(entry: dict) -> str:
        return f"{entry['name']} ({'planted' if entry['planted'] else 'not planted'})"

    lines = [f"First region of each mean map (planted: {', '.join(planted)}):", "",
             "| method | by summed relevance | by relevance per voxel |", "| --- | --- | --- |"]
    lines += [f"| {m} | {cell(f['by_sum'])} | {cell(f['by_density'])} |" for m, f in first.items() if m != PLANTED]
    return lines + [""]


def _region_lines(regions: dict[str, list[dict]], caption: str, value: Callable[[dict], str]) -> list[str]:
    lines = [caption, "", "| rank | " + " | ".join(regions) + " |", "| --- |" + " --- |" * len(regions)]
    for rank in range(max(len(r) for r in regions.values())):
        cells = [f"{r[rank]['name']} {value(r[rank])}" if rank < len(r) else "" for r in regions.values()]
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    return lines + [""]


def _distance_lines(distances: dict) -> list[str]:
    values = distances["values"]
    methods = list(values)
    lines = [f"Distance ({distances['metric'].upper()}) between the methods' mean maps, each normalised to sum 1:",
             "", "| | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    lines += [f"| {a} | " + " | ".join(f"{values[a][b]:.2e}" for b in methods) + " |" for a in methods]
    return lines + [""]
