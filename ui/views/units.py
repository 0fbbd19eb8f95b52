"""Units: the run's ranked units, their top-activating patches, the annotation form, agreement and export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from medxplain_contract.layout import RunLayout
from ui import agreement, data, lexicon
from ui.annotations import Annotation, Annotator
from ui.overlay import blend, draw_box, resize
from ui.widgets import guarded, run_picker

_REL = RunLayout("")  # keys relative to the run

DIM_BELOW = 0.2  # DeepMiner: map pixels under 0.2 of the top patch's maximum are dimmed


def ranked_units(rankings: dict | None, class_name: str, by: str) -> list[dict]:
    if not rankings:
        return []
    entry = rankings["classes"].get(class_name) or {}
    return list(entry.get("top8_frequency" if by == "top-8 frequency" else "mean_contribution") or [])


def patch_view(image: np.ndarray, patch: dict, scale: float) -> np.ndarray:
    """The patch cut from the full image with the unit's map over it (dimmed where weak)."""
    y0, x0, y1, x1 = patch["box"]
    crop = image[y0:y1, x0:x1]
    if crop.size == 0:
        return np.zeros((8, 8, 3), np.uint8)
    window = np.asarray(patch.get("map") or [[0.0]], np.float32) / (scale or 1.0)
    heat = np.clip(resize(window, crop.shape), 0, 1)
    rgb = blend(crop, heat, 0.55, "inferno", heat_range=(0.0, 1.0))
    dim = (heat < DIM_BELOW)[..., None]
    return np.where(dim, (rgb * 0.45).astype(np.uint8), rgb)


def full_view(image: np.ndarray, box) -> np.ndarray:
    y0, x0, y1, x1 = box
    return draw_box(np.repeat(image[..., None], 3, axis=2), (x0, y0, x1, y1), width=max(2, image.shape[1] // 200))


def unit_list(prefix: str, model: str, version: str, me: Annotator | None) -> int | None:
    rankings = data.optional_json(prefix, _REL.units("rankings.json"))
    names = list((rankings or {}).get("classes", {})) or data.class_names(prefix)
    c1, c2, c3 = st.columns([1, 1, 1])
    class_name = c1.selectbox("Class", names, index=len(names) - 1, key="units_class")
    by = c2.radio("Rank by", ["top-8 frequency", "mean contribution"], horizontal=True, key="units_by")
    top_n = c3.number_input("Units shown", 5, 200, 20, step=5, key="units_top_n")
    ranked = ranked_units(rankings, class_name, by)[: int(top_n)]
    progress = data.annotation_store().progress(model, version)
    if ranked:
        done = sum(1 for r in ranked if progress.get(r["unit"]))
        mine = sum(1 for r in ranked if me and me.id in progress.get(r["unit"], set()))
        st.progress(done / len(ranked), text=f"{done} of {len(ranked)} listed units annotated by anyone"
                    + (f" · {mine} by you" if me else ""))
        table = pd.DataFrame([{"rank": i + 1, "unit": r["unit"], "top-8 count": r.get("count", r.get("top8_count")),
                               "mean contribution": r.get("mean_contribution"),
                               "annotators": len(progress.get(r["unit"], ())),
                               "you": "✓" if me and me.id in progress.get(r["unit"], set()) else ""}
                              for i, r in enumerate(ranked)])
        st.dataframe(table, hide_index=True, width="stretch", height=260)
        options = [r["unit"] for r in ranked]
    else:
        st.caption("This run has no unit rankings; pick any unit by number.")
        options = []
    n_units = int(((data.optional_json(prefix, "analyses.json") or {}).get("units") or {}).get("units") or 0)
    any_unit = st.toggle("Pick any unit by number", value=not options, key="units_any")
    if any_unit or not options:
        return int(st.number_input("Unit", 0, max(n_units - 1, 0) if n_units else 100000, 0, key="unit_number"))
    return st.selectbox("Unit", options, key="unit_pick")


def patches(prefix: str, unit: int) -> None:
    atlas = data.optional_json(prefix, _REL.unit(unit))
    if not atlas or not atlas.get("patches"):
        st.info(f"No atlas entry for unit {unit} in this run.")
        return
    entries = atlas["patches"]
    shown = st.slider("Patches", 4, min(32, len(entries)) if len(entries) > 4 else 4,
                      min(16, len(entries)), key="unit_patches") if len(entries) > 4 else len(entries)
    scale = float(atlas.get("map_scale") or entries[0]["activation"] or 1.0)
    cols = st.columns(4)
    for i, patch in enumerate(entries[:shown]):
        image = data.input_image(prefix, patch["item_id"])
        cols[i % 4].image(patch_view(image, patch, scale), width="stretch",
                          caption=f"#{i + 1} {patch['item_id']} · act {patch['activation']:.2f}")
    choice = st.selectbox("Full image with the patch box", ["none", *range(1, shown + 1)],
                          format_func=lambda v: "none" if v == "none" else f"patch #{v}", key=f"unit_full_{unit}")
    if choice != "none":
        patch = entries[int(choice) - 1]
        st.image(full_view(data.input_image(prefix, patch["item_id"]), patch["box"]),
                 caption=f"{patch['item_id']} (box {patch['box']})", width=520)


def annotation_form(prefix: str, model: str, version: str, unit: int, me: Annotator | None) -> None:
    st.subheader(f"Annotate unit {unit}")
    if me is None:
        st.info("Type your annotator name in the sidebar to annotate.")
        return
    store = data.annotation_store()
    previous = store.latest(model, version, unit, me.id)
    if previous:
        st.caption(f"Your previous answer ({previous.created_at}) is filled in; saving adds a new version.")
    k = f"ann_{model}_{version}_{unit}_{me.id}"
    with st.form(key=f"form_{k}"):
        yes = st.radio("Do the patches show a recognisable concept?", ["yes", "no"], horizontal=True,
                       index=0 if (previous is None or previous.recognisable) else 1, key=f"{k}_recognisable")
        chosen = set(previous.concepts if previous else [])
        st.markdown("**BI-RADS concepts** (only kept when the answer above is *yes*)")
        for section, col in zip(lexicon.TREE, st.columns(len(lexicon.TREE))):
            with col:
                st.markdown(f"*{section.title}*")
                for group in section.groups:
                    st.caption(group.title)
                    for opt, text in group.options:
                        cid = f"{group.id}.{opt}"
                        st.checkbox(text, value=cid in chosen, key=f"{k}_{cid}")
        text = st.text_area("Description (free text; no patient identifiers)", value=previous.free_text if previous
                            else "", max_chars=2000, key=f"{k}_text")
        confidence = st.select_slider("Confidence", options=[1, 2, 3, 4, 5], value=previous.confidence if previous
                                      else 3, key=f"{k}_confidence")
        submitted = st.form_submit_button("Save annotation", type="primary")
    if submitted:
        concepts = [c for c in lexicon.CONCEPTS if st.session_state.get(f"{k}_{c}")]
        ann = Annotation(model=model, version_key=version, unit=unit, annotator_id=me.id, annotator_name=me.name,
                         recognisable=yes == "yes", concepts=concepts, free_text=text, confidence=int(confidence),
                         context={"run": prefix, "identity": me.mode}, authenticated=me.mode == "oidc")
        try:
            key = store.save(ann)
        except ValueError as err:
            st.error(f"Not saved: {err}")
            return
        labels = ", ".join(lexicon.label(c) for c in ann.validated().concepts) or "no concept"
        st.success(f"Saved: {'recognisable' if ann.recognisable else 'not recognisable'} · {labels}")
        st.caption(f"stored as {key}")
    history = store.history(model, version, unit, me.id)
    if history:
        with st.expander(f"Your history for unit {unit} ({len(history)} saves)"):
            st.dataframe(pd.DataFrame([{"saved": a.created_at, "recognisable": a.recognisable,
                                        "concepts": ", ".join(a.labels), "confidence": a.confidence,
                                        "text": a.free_text} for a in reversed(history)]),
                         hide_index=True, width="stretch")


def agreement_view(model: str, version: str) -> None:
    everything = data.annotation_store().latest_all(model, version)
    if not everything:
        st.info("No annotations for this model version yet.")
        return
    include_demo = st.toggle("Include demo-mode (not logged-in) answers", value=False, key="agree_include_demo",
                             help="Off: agreement and the export use only answers of logged-in annotators.")
    latest = agreement.select(everything, include_demo)
    left_out = sum(len(a) for a in everything.values()) - sum(len(a) for a in latest.values())
    if left_out:
        st.caption(f"{left_out} demo-mode answers are left out.")
    if not latest:
        st.info("No answers of logged-in annotators yet.")
        return
    question = st.radio("Question", agreement.QUESTIONS, horizontal=True, key="agree_question")
    table = agreement.agreement_table(latest, question)
    c1, c2, c3 = st.columns(3)
    c1.metric("Annotators", len(table["annotators"]))
    c2.metric("Units with ≥ 2 annotators", table["units_with_2plus"])
    c3.metric("Fleiss' kappa", "n/a" if np.isnan(table["fleiss"]) else f"{table['fleiss']:.2f}")
    if table["pairs"]:
        st.dataframe(pd.DataFrame(table["pairs"]), hide_index=True, width="stretch")
    else:
        st.caption("Cohen's kappa needs two annotators.")

    st.subheader("Consensus export")
    c1, c2 = st.columns(2)
    min_annotators = c1.number_input("Minimum annotators per unit", 1, 20, 1, key="export_min")
    share = c2.slider("Concept chosen by at least", 0.5, 1.0, 0.5, 0.05, key="export_share")
    labels = agreement.consensus(everything, model, version, int(min_annotators), float(share), include_demo)
    st.caption(f"{len(labels['units'])} units get labels.")
    st.dataframe(pd.DataFrame([{"unit": int(u), "labels": ", ".join(v["labels"]), "annotators": v["annotators"],
                                "recognisable share": v["recognisable_share"]} for u, v in labels["units"].items()]),
                 hide_index=True, width="stretch")
    st.download_button("Download unit_labels.json", json.dumps(labels, indent=2) + "\n", "unit_labels.json",
                       "application/json", key="export_download")
    st.markdown("Put the labels into the next model version (served explanations then carry them):")
    st.code(f"python -m model_store archive --bundle build/models/{model} --out build/model-store "
            "--unit-labels unit_labels.json" + (" --include-demo-answers" if include_demo else ""), language="bash")


@guarded
def main() -> None:
    st.title("Units")
    info = run_picker(kinds=("ddsm",), key="units_run")
    if info is None:
        return
    me: Annotator | None = st.session_state.get("annotator")
    model, version = data.model_version_key(info.prefix)
    st.caption(f"Annotations are kept per model version: **{model} / {version}** (version + weights sha256).")
    annotate, agree = st.tabs(["Annotate", "Agreement & export"])
    with annotate:
        unit = unit_list(info.prefix, model, version, me)
        if unit is not None:
            st.header(f"Unit {unit}")
            patches(info.prefix, unit)
            annotation_form(info.prefix, model, version, unit, me)
    with agree:
        agreement_view(model, version)


main()
