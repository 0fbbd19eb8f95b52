"""Cached access for the pages: one storage client per process, run objects cached without expiry.

Finished runs are immutable (``run.json`` is written last), so anything read from a run is cached
for the process lifetime; only the run list and annotations are re-read (short TTL / never cached),
because other processes add to them.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st

from medxplain_contract.decoding import decode_image, decode_volume
from medxplain_contract.similarity import SimilarityIndex
from medxplain_contract.storage import S3Config
from ui.annotations import AnnotationStore, version_key
from ui.overlay import shown_pixels, to_uint8
from ui.runs import Run, RunInfo, RunStore
from ui.settings import UISettings


@st.cache_resource(show_spinner=False)
def settings() -> UISettings:
    return UISettings.from_env()


@st.cache_resource(show_spinner=False)
def client():
    return S3Config.from_env().client()


def run(prefix: str) -> Run:
    return Run(client(), settings().runs_bucket, prefix)


def annotation_store() -> AnnotationStore:
    s = settings()
    return AnnotationStore(client(), s.annotations_bucket, s.annotations_prefix)


@st.cache_data(ttl=15, show_spinner="Looking for runs ...")
def list_runs() -> list[RunInfo]:
    s = settings()
    return RunStore(client(), s.runs_bucket, s.runs_prefix).list_runs()


@st.cache_data(show_spinner=False)
def class_names(prefix: str) -> list[str]:
    names = run(prefix).model_json().get("class_names")
    if names:
        return list(names)
    ids = run(prefix).item_ids()
    return list(run(prefix).result(ids[0])["prediction"]["probabilities"]) if ids else []


@st.cache_data(show_spinner=False)
def model_version_key(prefix: str) -> tuple[str, str]:
    """(model name, annotation version key) of a run: annotations follow the weights, not the run."""
    r = run(prefix)
    manifest_model = r.manifest.get("model") or {}
    meta, card = r.model_json(), r.model_card()
    name = str(meta.get("name") or manifest_model.get("name") or "model")
    version = str(meta.get("version") or manifest_model.get("version") or card.get("version") or "0")
    weights = card.get("weights_sha256") or manifest_model.get("weights_sha256")
    if not weights:
        ids = r.item_ids()
        weights = r.result(ids[0]).get("model", {}).get("weights_sha256") if ids else None
    return name, version_key(version, weights)


def _class_name(value, names: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        return value
    index = int(value)
    return names[index] if 0 <= index < len(names) else str(value)


@st.cache_data(show_spinner="Reading the run's results ...")
def cases(prefix: str) -> pd.DataFrame:
    """One row per complete item: ids, truth, prediction, correctness and class probabilities."""
    r = run(prefix)
    names = class_names(prefix)
    results = r.results(r.item_ids())
    rows = []
    for item_id, res in results.items():
        item = res.get("item") or {}
        truth = _class_name(item.get("truth"), names)
        predicted = res["prediction"]["label"]
        rows.append({"item": item_id, "case": item.get("case_id") or item_id,
                     "model": f"{res['model']['name']} {res['model']['version']}",
                     "truth": truth, "predicted": predicted,
                     "correct": None if truth is None else truth == predicted,
                     **{f"p({n})": float(p) for n, p in res["prediction"]["probabilities"].items()}})
    table = pd.DataFrame(rows, columns=["item", "case", "model", "truth", "predicted", "correct",
                                        *[f"p({n})" for n in names]])
    table.attrs["integrity"] = sorted(p.key for p in r.integrity_problems)  # items left out, by key
    return table


@st.cache_data(show_spinner=False)
def result(prefix: str, item_id: str) -> dict:
    return run(prefix).result(item_id)


@st.cache_data(show_spinner=False, max_entries=64)
def input_image(prefix: str, item_id: str) -> np.ndarray:
    """2D items: uint8 display pixels of input.png (the analysed input, in the analysed frame)."""
    return shown_pixels(decode_image(run(prefix).input_bytes(item_id, result(prefix, item_id))).pixels)


@st.cache_data(show_spinner=False, max_entries=16)
def mask_image(prefix: str, item_id: str) -> np.ndarray | None:
    """The item's ground-truth lesion mask (synthetic sets), as stored by the batch job."""
    return run(prefix).mask(item_id, result(prefix, item_id))


@st.cache_data(show_spinner=False, max_entries=8)
def input_volume(prefix: str, item_id: str) -> tuple[np.ndarray, np.ndarray]:
    """3D items: input.nii.gz (the analysed input, on the model grid) and its affine."""
    volume = decode_volume(run(prefix).input_bytes(item_id, result(prefix, item_id)))
    return volume.data, volume.affine


@st.cache_data(show_spinner=False, max_entries=32)
def heatmap(prefix: str, item_id: str, method: str) -> np.ndarray:
    """A 2D heatmap's true values, in the sent frame."""
    return run(prefix).heatmap(item_id, method, result(prefix, item_id))


@st.cache_data(show_spinner=False, max_entries=8)
def heatmap_on_input(prefix: str, item_id: str, method: str) -> np.ndarray:
    """A 3D heatmap resampled by the affines onto input.nii.gz's grid (it is stored on the sent grid)."""
    from ui.geometry import place_3d

    data, affine = input_volume(prefix, item_id)
    return place_3d(run(prefix).heatmap_image(item_id, method, result(prefix, item_id)), data.shape, affine)


@st.cache_data(show_spinner=False, max_entries=64)
def features(prefix: str, item_id: str) -> dict[str, np.ndarray]:
    return run(prefix).features(item_id)


@st.cache_data(show_spinner=False)
def optional_json(prefix: str, relative: str):
    return run(prefix).optional_json(relative)


@st.cache_data(show_spinner=False, max_entries=512)
def thumbnail(prefix: str, item_id: str, size: int = 192) -> bytes:
    """A small PNG of an item's input (2D: the image; 3D: the middle axial slice)."""
    from PIL import Image

    res = result(prefix, item_id)
    if (res.get("input") or {}).get("format") == "nifti":
        volume, _ = input_volume(prefix, item_id)
        pixels = to_uint8(np.rot90(volume[:, :, volume.shape[2] // 2]))
    else:
        pixels = input_image(prefix, item_id)
    img = Image.fromarray(pixels)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@st.cache_resource(show_spinner="Loading the similarity index ...")
def similarity_index(prefix: str) -> SimilarityIndex | None:
    """The contract's query class over index/similarity.json (+ embeddings.npy for ad-hoc queries)."""
    return run(prefix).similarity()


@st.cache_data(ttl=30, show_spinner=False)
def consensus_labels(prefix: str) -> dict[int, list[str]]:
    """Current experts' consensus per unit for the run's model version (before it ships in an archive).

    Logged-in annotators' answers only; a UI running in demo mode also shows its demo answers (the
    export still leaves them out unless included explicitly).
    """
    from ui.agreement import consensus
    from ui.settings import demo_mode_enabled

    model, version = model_version_key(prefix)
    labels = consensus(annotation_store().latest_all(model, version), model, version,
                       include_demo=demo_mode_enabled())
    return {int(u): v["labels"] for u, v in labels["units"].items()}
