"""Compact heatmap encodings that fit TorchServe's response limits.

2D maps: an 8-bit greyscale PNG quantised over [min, max] (the scale is returned so values can be
restored), or raw little-endian float16. 3D maps: gzip-compressed NIfTI stored as uint8 with the
NIfTI scaling fields (scl_slope / scl_inter) carrying the value scale and the *input's* affine, so
a radiology viewer overlays the map on the scan it came from and reads true values. A float32
193x229x193 map would be ~34 MB; this is typically well under 1 MB.
"""

from __future__ import annotations

import base64
import gzip
import io

import nibabel as nib
import numpy as np
from PIL import Image


def finite(values: np.ndarray) -> np.ndarray:
    """float32 with NaN/inf set to 0: a map never carries non-finite values (nor its scale)."""
    return np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _scale(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> tuple[np.ndarray, float, float]:
    values = finite(values)
    lo = float(values.min()) if lo is None or not np.isfinite(lo) else lo
    hi = float(values.max()) if hi is None or not np.isfinite(hi) else hi
    span = hi - lo if hi > lo else 1.0
    q = np.clip(np.rint((values - lo) / span * 255.0), 0, 255).astype(np.uint8)
    return q, lo, hi


def encode_2d(values: np.ndarray, encoding: str, lo: float | None = None, hi: float | None = None) -> dict:
    values = finite(values)
    if encoding == "float16":
        return {"encoding": "float16", "shape": list(values.shape), "dtype": "<f2",
                "data": base64.b64encode(values.astype("<f2").tobytes()).decode()}
    q, lo, hi = _scale(values, lo, hi)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG", optimize=True)
    return {"encoding": "png", "shape": list(values.shape), "scale": {"min": lo, "max": hi},
            "data": base64.b64encode(buf.getvalue()).decode()}


def decode_2d(encoded: dict) -> np.ndarray:
    """Inverse of :func:`encode_2d` (used by the client and the tests)."""
    raw = base64.b64decode(encoded["data"])
    if encoded["encoding"] == "float16":
        return np.frombuffer(raw, dtype="<f2").reshape(encoded["shape"]).astype(np.float32)
    q = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float32)
    lo, hi = encoded["scale"]["min"], encoded["scale"]["max"]
    return lo + q / 255.0 * (hi - lo if hi > lo else 1.0)


def encode_3d(values: np.ndarray, affine: np.ndarray) -> dict:
    values = finite(values)
    q, lo, hi = _scale(values)
    img = nib.Nifti1Image(q, affine)
    img.header.set_slope_inter((hi - lo) / 255.0 if hi > lo else 1.0, lo)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(raw)
    return {"encoding": "nifti.gz", "shape": list(values.shape), "scale": {"min": lo, "max": hi},
            "data": base64.b64encode(buf.getvalue()).decode()}


def decode_3d(encoded: dict) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded["data"])))
