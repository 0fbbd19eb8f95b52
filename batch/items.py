"""One item's objects: the engine's response and features laid out as docs/architecture.md says.

Bytes are deterministic for the same input and model (fixed zip timestamps in ``.npz``, sorted
JSON keys, no wall-clock values besides the engine's own ``timing_ms``), so a sharded run and an
unsharded run produce the same objects.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zipfile

import nibabel as nib
import numpy as np
from PIL import Image

from batch.sources import SourceItem
from medxplain_contract.encodings import SUFFIXES as _SUFFIX
from medxplain_contract.encodings import encode_3d
from medxplain_engine.features import ItemFeatures

_CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".npz": "application/octet-stream",
                  ".nii.gz": "application/gzip", ".f16": "application/octet-stream"}


def content_type(key: str) -> str:
    return next((t for s, t in _CONTENT_TYPES.items() if key.endswith(s)), "application/octet-stream")


def json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like ``np.savez_compressed`` but byte-stable: numpy stamps members with the current time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def _move_data(encoded: dict, key: str, objects: dict[str, bytes]) -> dict:
    """Replace base64 ``data`` by the key of an object holding the same bytes."""
    out = {k: v for k, v in encoded.items() if k != "data"}
    out["object"] = key
    objects[key] = base64.b64decode(encoded["data"])
    return out


def display_copy(kind: str, features: ItemFeatures, geometry: dict) -> tuple[str, bytes]:
    """The analysed input for display: 8-bit PNG (ddsm, in the ``analysed_size`` frame of the response's
    ``input.geometry``) or uint8-scaled NIfTI on the model grid with ``geometry.model_affine`` (adni).

    Built from the engine's analysed array, so no header of the source file survives.
    """
    if kind == "ddsm":
        pixels = np.clip(np.rint(np.asarray(features.display, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return "input.png", buf.getvalue()
    encoded = encode_3d(features.display, np.asarray(geometry["model_affine"], dtype=np.float64))
    return "input.nii.gz", base64.b64decode(encoded["data"])


def mask_copy(kind: str, data: bytes) -> tuple[str, bytes]:
    """The ground-truth mask, re-encoded from its pixels only (no header data travels along)."""
    if kind == "ddsm":
        mask = np.asarray(Image.open(io.BytesIO(data)))
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
        return "mask.png", buf.getvalue()
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    img = nib.Nifti1Image.from_bytes(raw)
    clean = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8), img.affine)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(clean.to_bytes())
    return "mask.nii.gz", buf.getvalue()


def item_objects(kind: str, item: SourceItem, response: dict, features: ItemFeatures,
                 mask: bytes | None) -> dict[str, bytes]:
    """Relative key (under items/<id>/) -> bytes, without the completion marker."""
    objects: dict[str, bytes] = {}
    result = dict(response)
    if "heatmaps" in result:
        result["heatmaps"] = {m: _move_data(h, f"heatmaps/{m}{_SUFFIX[h['encoding']]}", objects)
                              for m, h in result["heatmaps"].items()}
    if "unit_maps" in result:
        result["unit_maps"] = {u: _move_data(h, f"unit_maps/{int(u):04d}{_SUFFIX[h['encoding']]}", objects)
                               for u, h in result["unit_maps"].items()}
    # No source key here: file names can carry identifiers (the mapping is in private/sources.json).
    result["item"] = {"id": item.item_id, "case_id": item.case_id, "truth": item.truth}
    arrays = {"pooled": features.pooled, "peak": features.peak, "map_shape": np.asarray(features.map_shape, np.int32),
              "cell_size": np.asarray(features.cell_size, np.float64), "embedding": features.embedding}
    if features.peak_maps is not None:
        arrays["peak_maps"] = features.peak_maps
    if features.contributions is not None:
        arrays["contributions"] = features.contributions.astype(np.float32)
        result["units_per_class"] = features.top_units_per_class(list(response["prediction"]["probabilities"]))
    if features.class_map is not None:
        arrays["class_map"] = features.class_map.astype(np.float16)
    objects["features.npz"] = npz_bytes(arrays)
    name, data = display_copy(kind, features, response["input"]["geometry"])
    objects[name] = data
    if mask is not None:
        try:
            name, data = mask_copy(kind, mask)
        except Exception:  # noqa: BLE001 - a bad mask costs the quality report this item, not the item
            result["item"]["mask"] = None
        else:
            objects[name] = data
            result["item"]["mask"] = name
    objects["result.json"] = json_bytes(result)
    return objects


def failure_record(item: SourceItem, code: str, message: str, attempts: int, status: int | None = None) -> bytes:
    return json_bytes({"id": item.item_id, "error": code, "message": message,
                       "status": status, "attempts": attempts})
