"""Cases: pick a run, filter its items, and look at one case's prediction and explanation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from ui import data
from ui.geometry import place_2d
from ui.overlay import COLORMAPS, blend, outline, paste_window
from ui.triplanar import viewer
from ui.widgets import guarded, run_picker

MAX_UNIT_MAPS = 4


def filter_cases(table: pd.DataFrame, truth: list[str], predicted: list[str], correctness: str) -> pd.DataFrame:
    """The rows matching the filters (empty selections mean 'any')."""
    keep = pd.Series(True, index=table.index)
    if truth:
        keep &= table["truth"].isin(truth)
    if predicted:
        keep &= table["predicted"].isin(predicted)
    if correctness == "correct":
        keep &= table["correct"].eq(True)
    elif correctness == "incorrect":
        keep &= table["correct"].eq(False)
    return table[keep]


def overlay_controls(methods: list[str], key: str) -> tuple[str | None, float, str]:
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Heatmap", methods or ["none"], key=f"{key}_method")
    opacity = c2.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key=f"{key}_opacity")
    cmap = c3.selectbox("Colour map", COLORMAPS, key=f"{key}_cmap")
    return (None if method == "none" else method), opacity, cmap


def probabilities_chart(res: dict) -> None:
    probs = res["prediction"]["probabilities"]
    st.bar_chart(pd.DataFrame({"probability": list(probs.values())}, index=list(probs)), horizontal=True,
                 height=60 + 30 * len(probs))


def units_table(res: dict, live: dict[int, list[str]]) -> None:
    """Ranked units with the archive's labels and the experts' current consensus (not yet shipped)."""
    units = res.get("units") or []
    if not units:
        st.caption("No ranked units in this result.")
        return
    st.dataframe(pd.DataFrame([{"rank": u["rank"], "unit": u["unit"], "activation": u["activation"],
                                "weight": u["weight"], "contribution": u["contribution"],
                                "concept labels": ", ".join(u.get("labels") or []) or "—",
                                "current consensus": ", ".join(live.get(int(u["unit"]), [])) or "—"} for u in units]),
                 hide_index=True, width="stretch")


def show_2d(prefix: str, item_id: str, res: dict) -> None:
    image = data.input_image(prefix, item_id)
    method, opacity, cmap = overlay_controls(sorted(res.get("heatmaps") or {}), "case")
    # heatmaps are in the sent frame, input.png in the analysed one: resized by the recorded sizes
    heat = place_2d(data.heatmap(prefix, item_id, method), res["input"], "analysed", image.shape) if method else None
    shown = blend(image, heat, opacity, cmap)
    if (res.get("item") or {}).get("mask") and st.toggle("Ground-truth lesion outline", key="case_mask"):
        shown = outline(shown, data.mask_image(prefix, item_id))
    left, right = st.columns([3, 2])
    left.image(shown, caption=f"{item_id} · {method or 'no heatmap'}", width="stretch")
    with right:
        st.subheader("Class probabilities")
        probabilities_chart(res)
        st.subheader("Top units")
        units_table(res, data.consensus_labels(prefix))
    unit_maps(prefix, item_id, res, image, opacity, cmap)


def unit_maps(prefix: str, item_id: str, res: dict, image: np.ndarray, opacity: float, cmap: str) -> None:
    """Each top unit's own map (its peak window from the run's features), normalised together."""
    units = (res.get("units") or [])[:MAX_UNIT_MAPS]
    if not units:
        return
    try:
        feats = data.features(prefix, item_id)
    except KeyError:
        return
    if feats.get("peak_maps") is None or not np.asarray(feats["peak_maps"]).size:
        return
    maps = {u["unit"]: paste_window(feats["map_shape"], feats["peak"][u["unit"]], feats["peak_maps"][u["unit"]])
            for u in units}
    top = max(float(m.max()) for m in maps.values()) or 1.0
    st.subheader("Per-unit maps")
    st.caption("Each unit's activation around its peak, normalised together (DeepMiner's display).")
    for col, u in zip(st.columns(len(units)), units):
        labels = ", ".join(u.get("labels") or []) or "no expert label yet"
        col.image(blend(image, maps[u["unit"]], max(opacity, 0.5), cmap, heat_range=(0.0, top)),
                  caption=f"#{u['rank']} unit {u['unit']}: {labels}", width="stretch")


def show_3d(prefix: str, item_id: str, res: dict) -> None:
    volume, _ = data.input_volume(prefix, item_id)
    methods = sorted(res.get("heatmaps") or {})
    method, opacity, cmap = overlay_controls(methods, "case3d")
    heat = data.heatmap_on_input(prefix, item_id, method) if method else None
    viewer(volume, heat, opacity, cmap, key=f"tri_{item_id}")
    left, right = st.columns([2, 3])
    with left:
        st.subheader("Class probabilities")
        probabilities_chart(res)
        st.subheader("Top units")
        units_table(res, data.consensus_labels(prefix))
    with right:
        regions = ((res.get("regions") or {}).get(method) or []) if method else []
        st.subheader("Region relevance")
        if regions:
            top = sorted(regions, key=lambda r: r.get("rank", 0))[:15]
            st.bar_chart(pd.DataFrame({"relevance per voxel": [r["per_voxel"] for r in top]},
                                      index=[r["name"] for r in top]), horizontal=True, height=420)
        else:
            st.caption("No region table for this heatmap.")


@guarded
def main() -> None:
    st.title("Cases")
    info = run_picker(key="cases_run")
    if info is None:
        return
    table = data.cases(info.prefix)
    if table.attrs.get("integrity"):
        st.warning("Left out (content differs from the checksum recorded at write time): "
                   + ", ".join(table.attrs["integrity"]))
    if table.empty:
        st.info("This run has no complete items.")
        return
    labels = data.class_names(info.prefix)
    c1, c2, c3 = st.columns(3)
    truth = c1.multiselect("True label", labels, key="filter_truth")
    predicted = c2.multiselect("Predicted label", labels, key="filter_predicted")
    correctness = c3.radio("Prediction", ["all", "correct", "incorrect"], horizontal=True, key="filter_correct")
    shown = filter_cases(table, truth, predicted, correctness)
    st.caption(f"{len(shown)} of {len(table)} items")
    st.dataframe(shown, hide_index=True, width="stretch", height=240)
    if shown.empty:
        st.info("No item matches these filters.")
        return
    item_id = st.selectbox("Case", shown["item"].tolist(), key="case_item")
    res = data.result(info.prefix, item_id)
    row = shown[shown["item"] == item_id].iloc[0]
    st.markdown(f"**True:** {row['truth'] or 'unknown'} · **Predicted:** {row['predicted']} · "
                f"**Model:** {row['model']}")
    for warning in res.get("warnings") or []:
        st.warning(str(warning))
    if (res.get("input") or {}).get("format") == "nifti":
        show_3d(info.prefix, item_id, res)
    else:
        show_2d(info.prefix, item_id, res)


main()
