"""Analyse: send a new image to TorchServe and show prediction, units and heatmaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from ui import data, serving
from ui.overlay import COLORMAPS, DecodeError, blend, decode_map_entry, load_image, load_volume
from ui.triplanar import viewer
from ui.widgets import guarded

METHODS = {"ddsm": ["cam", "gradcam", "saliency", "guided_backprop", "integrated_gradients", "occlusion"],
           "adni": ["gradcam", "sensitivity", "guided_backprop", "integrated_gradients", "area_occlusion", "occlusion"]}
DEFAULTS = {"ddsm": ["cam"], "adni": ["gradcam"]}
UNIT_MAPS = 4


def is_volume(payload: bytes) -> bool:
    """NIfTI-1 (gzip or not) has 348 in its first 4 bytes or is gzip; images are decoded by PIL/pydicom."""
    return payload[:2] == b"\x1f\x8b" or payload[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")


def show_response(response: dict, payload: bytes) -> None:
    pred = response["prediction"]
    st.success(f"Prediction: **{pred['label']}** ({pred['probabilities'][pred['label']]:.1%}) · "
               f"model {response['model']['name']} {response['model']['version']}")
    for warning in response.get("warnings") or []:
        st.warning(str(warning))
    methods = sorted(response.get("heatmaps") or {})
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Heatmap", methods or ["none"], key="analyse_method")
    opacity = c2.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="analyse_opacity")
    cmap = c3.selectbox("Colour map", COLORMAPS, key="analyse_cmap")
    heat = decode_map_entry(response["heatmaps"][method]) if methods else None
    if is_volume(payload):
        volume, _ = load_volume(payload)
        viewer(volume, heat, opacity, cmap, key="analyse_tri")
        regions = (response.get("regions") or {}).get(method) or []
        if regions:
            top = sorted(regions, key=lambda r: r.get("rank", 0))[:15]
            st.subheader("Region relevance")
            st.bar_chart(pd.DataFrame({"relevance per voxel": [r["per_voxel"] for r in top]},
                                      index=[r["name"] for r in top]), horizontal=True, height=420)
        image = None
    else:
        image = load_image(payload)
        left, right = st.columns([3, 2])
        left.image(blend(image, heat, opacity, cmap), caption=method, width="stretch")
        with right:
            probs = pred["probabilities"]
            st.bar_chart(pd.DataFrame({"probability": list(probs.values())}, index=list(probs)), horizontal=True)
    units = response.get("units") or []
    if units:
        st.subheader("Top units")
        st.dataframe(pd.DataFrame([{"rank": u["rank"], "unit": u["unit"], "contribution": u["contribution"],
                                    "activation": u["activation"],
                                    "concept labels": ", ".join(u.get("labels") or []) or "—"} for u in units]),
                     hide_index=True, width="stretch")
    maps = response.get("unit_maps") or {}
    if image is not None and maps:
        shown = [u for u in units if str(u["unit"]) in maps][:UNIT_MAPS]
        for col, u in zip(st.columns(max(len(shown), 1)), shown):
            values = decode_map_entry(maps[str(u["unit"])])
            col.image(blend(image, values, max(opacity, 0.5), cmap, heat_range=(0.0, float(np.max(values)) or 1.0)),
                      caption=f"unit {u['unit']}: {', '.join(u.get('labels') or []) or 'no label'}", width="stretch")


@guarded
def main() -> None:
    st.title("Analyse an image")
    st.caption("The file goes to TorchServe for this request only; nothing is stored, no header is shown.")
    upload = st.file_uploader("PNG, JPEG, TIFF, DICOM (mammogram) or NIfTI (brain MRI)", type=serving.FILE_TYPES,
                              key="analyse_upload")
    payload = upload.getvalue() if upload is not None else None
    guess = "adni" if payload is not None and is_volume(payload) else "ddsm"
    c1, c2 = st.columns([1, 3])
    model = c1.selectbox("Model", ["ddsm", "adni"], index=["ddsm", "adni"].index(guess), key=f"analyse_model_{guess}")
    methods = c2.multiselect("Heatmap methods", METHODS[model], default=DEFAULTS[model], key=f"analyse_methods_{model}")
    if payload is None:
        return
    if st.button("Analyse", type="primary", key="analyse_go"):
        try:
            (load_volume if is_volume(payload) else load_image)(payload)  # refuse unreadable files before sending
        except DecodeError as err:
            st.session_state.pop("analyse_response", None)
            st.error(f"Cannot read this file: {err}")
            return
        with st.spinner("TorchServe is working ..."):
            try:
                response = serving.call(data.settings(), model, payload, methods=methods or None, top_k=8,
                                        unit_maps=model == "ddsm")
            except serving.ServingError as err:
                st.session_state.pop("analyse_response", None)
                st.error(str(err))
                return
        st.session_state["analyse_response"] = (hash(payload), response)
    stored = st.session_state.get("analyse_response")
    if stored and stored[0] == hash(payload):
        show_response(stored[1], payload)


main()
