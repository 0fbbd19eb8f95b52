"""Similar: the top-20 most similar images of the run for one of its cases or for an uploaded image."""

from __future__ import annotations

import numpy as np
import streamlit as st

from medxplain_contract.decoding import decode_image, decode_volume
from ui import data, serving
from ui.overlay import shown_pixels, to_uint8
from ui.widgets import guarded, run_picker

K = 20
COLUMNS = 5


def show_neighbours(prefix: str, neighbours) -> None:
    if not neighbours:
        st.info("No similar images (the run may hold only this case).")
        return
    st.subheader(f"Top {len(neighbours)} similar images")
    cols = st.columns(COLUMNS)
    for i, n in enumerate(neighbours):
        with cols[i % COLUMNS]:
            st.image(data.thumbnail(prefix, n.item_id), width="stretch")
            st.caption(f"#{i + 1} · score {n.score:.3f}  \n{n.item_id}  \ntrue: {n.truth or 'unknown'} · "
                       f"predicted: {n.predicted}")


def query_from_upload(prefix: str, index) -> list | None:
    upload = st.file_uploader("Image (PNG, JPEG, TIFF, DICOM or NIfTI)", type=serving.FILE_TYPES,
                              key="similar_upload")
    if upload is None:
        return None
    payload = upload.getvalue()
    if not index.can_query:
        st.error("This run has no embedding matrix or ANN index (index/), so uploads cannot be compared.")
        return None
    model = data.run(prefix).model_json()
    name = model.get("name") or data.model_version_key(prefix)[0]
    try:
        if model.get("kind") == "adni":
            volume = decode_volume(payload).data
            shown = to_uint8(np.rot90(volume[:, :, volume.shape[2] // 2]))
        else:
            shown = shown_pixels(decode_image(payload).pixels)
    except ValueError as err:
        st.error(f"Cannot read this file: {err}")
        return None
    st.image(shown, caption="query", width=240)
    with st.spinner("Computing the embedding on TorchServe ..."):
        try:
            response = serving.call(data.settings(), name, payload, top_k=index.dim)
            vector = serving.embedding_from_response(response, index.dim)
        except serving.ServingError as err:
            st.error(str(err))
            return None
    run_weights = data.run(prefix).model_card().get("weights_sha256")
    served = response.get("model", {}).get("weights_sha256")
    if run_weights and served and run_weights != served:
        st.error("TorchServe serves different weights than the ones this run was made with; the scores would "
                 "compare different feature spaces.")
        return None
    st.caption(f"Predicted by {name}: {response['prediction']['label']}")
    return index.query(vector, K)


@guarded
def main() -> None:
    st.title("Similar images")
    info = run_picker(key="similar_run")
    if info is None:
        return
    index = data.similarity_index(info.prefix)
    if index is None:
        st.info("This run has no similarity index (index/similarity.json).")
        return
    source = st.radio("Query", ["a case of the run", "an uploaded image"], horizontal=True, key="similar_source")
    if source == "a case of the run":
        ids = [item["id"] for item in index.items]
        item_id = st.selectbox("Case", ids, key="similar_item")
        row = index.items[ids.index(item_id)]
        left, right = st.columns([1, 4])
        left.image(data.thumbnail(info.prefix, item_id), caption="query", width="stretch")
        right.markdown(f"**{item_id}** · true: {row.get('truth') or 'unknown'} · predicted: {row['predicted']}  \n"
                       "Images of the same case are excluded.")
        show_neighbours(info.prefix, index.neighbours(item_id, K))
    else:
        neighbours = query_from_upload(info.prefix, index)
        if neighbours is not None:
            show_neighbours(info.prefix, neighbours)


main()
