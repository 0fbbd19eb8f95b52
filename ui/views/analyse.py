"""Analyse: send a new image to TorchServe and show prediction, units and heatmaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from medxplain_contract.decoding import decode_image, decode_volume
from medxplain_contract.encodings import decode_3d, decode_map
from medxplain_contract.errors import InputError
from ui import data, serving
from ui.geometry import place_2d, place_3d, volume_affine
from ui.overlay import COLORMAPS, blend, shown_pixels
from ui.triplanar import viewer
from ui.widgets import guarded

METHODS = {"ddsm": ["cam", "gradcam", "saliency", "guided_backprop", "integrated_gradients", "occlusion"],
           "adni": ["gradcam", "sensitivity", "guided_backprop", "integrated_gradients", "area_occlusion", "occlusion"]}
DEFAULTS = {"ddsm": ["cam"], "adni": ["gradcam"]}
UNIT_MAPS = 4


def is_volume(payload: bytes) -> bool:
    """NIfTI-1 (gzip or not) has 348 in its first 4 bytes or is gzip; images are decoded by PIL/pydicom."""
    return payload[:2] == b"\x1f\x8b" or payload[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")


def volume_heat(response: dict, method: str | None, shown) -> np.ndarray | None:
    """The 3D map resampled by its affine onto the sent volume (which must have the recorded affine)."""
    if method is None:
        return None
    recorded = volume_affine(response["input"])
    if not np.allclose(recorded, shown.affine, atol=1e-4):
        st.error("The response's affine differs from the file's; the map is not shown.")
        return None
    return place_3d(decode_3d(response["heatmaps"][method]), shown.data.shape, shown.affine)


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
    if is_volume(payload):
        volume = decode_volume(payload)
        viewer(volume.data, volume_heat(response, method if methods else None, volume), opacity, cmap,
               key="analyse_tri")
        regions = (response.get("regions") or {}).get(method) or []
        if regions:
            top = sorted(regions, key=lambda r: r.get("rank", 0))[:15]
            st.subheader("Region relevance")
            st.bar_chart(pd.DataFrame({"relevance per voxel": [r["per_voxel"] for r in top]},
                                      index=[r["name"] for r in top]), horizontal=True, height=420)
        image = None
    else:
        image = shown_pixels(decode_image(payload).pixels)  # what the model analysed, in the sent frame
        heat = place_2d(decode_map(response["heatmaps"][method]), response["input"], "sent", image.shape) \
            if methods else None
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
            values = place_2d(decode_map(maps[str(u["unit"])]), response["input"], "sent", image.shape)
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
            (decode_volume if is_volume(payload) else decode_image)(payload)  # refuse unreadable files before sending
        except InputError as err:
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
