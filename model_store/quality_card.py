"""What a client needs to know about each method's maps, taken from an evaluation report into the model card.

``python -m model_store evaluate --card`` writes this summary into the bundle's ``model_card.json``
(``explanation_quality``); the serving engine reads it back into its method descriptions
(``Engine.describe_methods``) and into every heatmap it returns, so a client sees which maps
passed the randomisation check and how often they point at the lesion, for this very model.
"""

from __future__ import annotations

import json
from pathlib import Path

from medxplain_models.bundle import MODEL_CARD, WEIGHTS, sha256_file

CARD_KEY = "explanation_quality"
_KEEP = ("pointing_game", "mass_accuracy", "rank_accuracy", "deletion_auc", "insertion_auc")


def summarise(report: dict) -> dict:
    """Per method and setting: sanity flag and ρ (top layer / full), pointing game and the other scores."""
    rnd = report["settings"]["randomisation"]
    methods: dict[str, dict] = {}
    for setting, result in report["evaluations"].items():
        for method, r in result["methods"].items():
            rho = r.get("randomisation_spearman", {})
            methods.setdefault(method, {})[setting] = {
                "sanity": r.get("sanity"), "rho_top_layer": rho.get(rnd["top"]), "rho_full": rho.get(rnd["full"]),
                **{k: round(r[k], 4) for k in _KEEP if k in r}, "cases": result["cases"]}
    return {"weights_sha256": report["model"]["weights_sha256"], "split": report["settings"]["split"],
            "limit": report["settings"]["limit"], "target": report["settings"]["target"],
            "sanity_threshold": report["settings"]["sanity_threshold"],
            "tolerance": {s: f"{r['tolerance']:g} {r['tolerance_unit']}" for s, r in report["evaluations"].items()},
            "settings": {s: r["description"] for s, r in report["evaluations"].items()},
            "methods": methods,
            "how_to_read": "sanity 'ok': the map changes when the model is randomised (it explains the model); "
                           "'top-layer insensitive': it barely changes when the output layer is re-initialised; "
                           "'fail': it survives full randomisation. pointing_game: share of lesion cases whose "
                           "map peaks on the lesion (see docs/explanation-quality.md)"}


def write_card(bundle_dir: Path, report: dict) -> dict:
    """Store the summary in ``model_card.json``; refused if the report is about other weights."""
    card_path = Path(bundle_dir) / MODEL_CARD
    card = json.loads(card_path.read_text())
    weights = sha256_file(Path(bundle_dir) / WEIGHTS)
    if report["model"]["weights_sha256"] != weights:
        raise ValueError(f"{bundle_dir}: the report was computed on other weights; re-run the evaluation")
    card[CARD_KEY] = summarise(report)
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card[CARD_KEY]
