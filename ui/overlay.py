"""Heatmap overlays with NumPy/PIL (``st.image`` has none) and decoding of the API's map encodings.

Encodings (docs/api.md): ``png`` = 8-bit grey quantised over ``scale.min..max``; ``float16`` =
little-endian float16 of ``shape``; ``nifti.gz`` = gzip NIfTI whose scaling fields give true values.
"""

from __future__ import annotations

import base64
import gzip
import io

import numpy as np
from PIL import Image

# Anchor colours (0..1 positions) of a few perceptual maps, interpolated to 256 entries; enough for
# display without a plotting library.
_ANCHORS: dict[str, list[tuple[int, int, int]]] = {
    "inferno": [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                (250, 193, 39), (252, 255, 164)],
    "viridis": [(68, 1, 84), (70, 50, 126), (54, 92, 141), (39, 127, 142), (31, 161, 135), (74, 193, 109),
                (160, 218, 57), (253, 231, 37)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0),
            (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "hot": [(11, 0, 0), (128, 0, 0), (255, 0, 0), (255, 128, 0), (255, 255, 0), (255, 255, 128), (255, 255, 255)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}
COLORMAPS = tuple(_ANCHORS)


class DecodeError(ValueError):
    """An image or map could not be decoded; the message is meant for people."""


def colormap(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table."""
    anchors = np.asarray(_ANCHORS[name], dtype=np.float32)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def decode_map_bytes(raw: bytes, encoding: str, scale: dict | None = None, shape=None) -> np.ndarray:
    """Raw object bytes (not base64) of one encoded map -> float32 array of true values."""
    if encoding == "png":
        q = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float32)
        if q.ndim == 3:
            q = q[..., 0]
        if not scale:
            return q / 255.0
        lo, hi = float(scale["min"]), float(scale["max"])
        return (lo + q / 255.0 * (hi - lo if hi > lo else 1.0)).astype(np.float32)
    if encoding == "float16":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        return values.reshape(shape) if shape is not None else values
    if encoding in ("nifti.gz", "nifti"):
        data, _ = load_volume(raw)
        return data
    raise DecodeError(f"unknown map encoding {encoding!r}")


def decode_map_entry(entry: dict) -> np.ndarray:
    """One API response map (``{"encoding", "data": base64, ...}``) -> float32 array."""
    return decode_map_bytes(base64.b64decode(entry["data"]), entry["encoding"], entry.get("scale"), entry.get("shape"))


def load_volume(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI bytes (gzip or not) -> (float32 data with scaling applied, affine)."""
    import nibabel as nib

    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        img = nib.Nifti1Image.from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # noqa: BLE001 -- nibabel raises many types for broken files
        raise DecodeError(f"not a readable NIfTI-1 volume ({type(err).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DecodeError(f"expected a 3D volume, got shape {data.shape}")
    return data, img.affine


def load_image(raw: bytes) -> np.ndarray:
    """PNG/JPEG/TIFF/DICOM bytes -> float32 greyscale pixels (DICOM headers are not kept)."""
    if len(raw) > 132 and raw[128:132] == b"DICM":
        return _load_dicom(raw)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as err:  # noqa: BLE001 -- decoders raise many types for broken files
        raise DecodeError(f"not a readable image ({type(err).__name__}); expected PNG, JPEG, TIFF or DICOM") from None
    if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32)


def _load_dicom(raw: bytes) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
        pixels = ds.pixel_array.astype(np.float32)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            pixels = pixels.max() - pixels
    except Exception as err:  # noqa: BLE001 -- decoders raise many types for broken files
        raise DecodeError(f"not a readable DICOM image ({type(err).__name__})") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    elif pixels.ndim != 2:
        raise DecodeError(f"expected a single 2D DICOM frame, got shape {pixels.shape}")
    return pixels


def to_uint8(image: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Window any greyscale array to 0..255 (percentiles by default, robust to hot pixels)."""
    image = np.asarray(image, dtype=np.float32)
    lo = float(np.percentile(image, 0.5)) if lo is None else lo
    hi = float(np.percentile(image, 99.5)) if hi is None else hi
    span = hi - lo if hi > lo else 1.0
    return (np.clip((image - lo) / span, 0, 1) * 255).round().astype(np.uint8)


def resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width)."""
    if tuple(values.shape) == tuple(shape):
        return values.astype(np.float32)
    img = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize((int(shape[1]), int(shape[0])), Image.BILINEAR), dtype=np.float32)


def normalise(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    lo = float(np.nanmin(values)) if lo is None else lo
    hi = float(np.nanmax(values)) if hi is None else hi
    return np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)


def blend(image: np.ndarray, heat: np.ndarray | None, alpha: float = 0.5, cmap: str = "inferno",
          threshold: float = 0.15, heat_range: tuple[float, float] | None = None) -> np.ndarray:
    """Greyscale image (any range) + heatmap (any size) -> RGB uint8.

    The heatmap is resized to the image, scaled to 0..1 over ``heat_range`` (default its own
    min..max) and blended with weight ``alpha * value`` where value > threshold, so weak
    relevance does not tint the whole image.
    """
    grey = image if image.dtype == np.uint8 else to_uint8(image)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if heat is None or alpha <= 0:
        return rgb.astype(np.uint8)
    h = normalise(resize(heat, grey.shape), *(heat_range or (None, None)))
    colours = colormap(cmap)[(h * 255).round().astype(np.uint8)].astype(np.float32)
    weight = (alpha * np.where(h > threshold, np.sqrt(h), 0.0))[..., None]
    return (rgb * (1 - weight) + colours * weight).round().clip(0, 255).astype(np.uint8)


def draw_box(rgb: np.ndarray, box: tuple[float, float, float, float], colour=(0, 255, 0), width: int = 3) -> np.ndarray:
    """Outline (x0, y0, x1, y1) in pixels on a copy of an RGB image."""
    from PIL import ImageDraw

    img = Image.fromarray(rgb)
    ImageDraw.Draw(img).rectangle([float(v) for v in box], outline=tuple(colour), width=width)
    return np.asarray(img)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def paste_window(map_shape, peak, window: np.ndarray) -> np.ndarray:
    """A unit's full map rebuilt from the batch job's peak window (zero elsewhere), on the map grid."""
    canvas = np.zeros(tuple(int(s) for s in map_shape), np.float32)
    w = np.asarray(window, np.float32)
    half = w.shape[0] // 2
    r0, c0 = int(peak[0]) - half, int(peak[1]) - half
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + w.shape[0], canvas.shape[0]), min(c0 + w.shape[1], canvas.shape[1])
    if re > rs and ce > cs:
        canvas[rs:re, cs:ce] = w[rs - r0:re - r0, cs - c0:ce - c0]
    return canvas


def outline(rgb: np.ndarray, mask: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    """Draw the border of a binary mask (resized to the image, nearest) on a copy of an RGB image."""
    m = np.asarray(mask) > 0
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((rgb.shape[1], rgb.shape[0]),
                                                                           Image.NEAREST)) > 0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    edge[1:, :] |= edge[:-1, :]  # two pixels wide, visible after downscaling
    edge[:, 1:] |= edge[:, :-1]
    out = rgb.copy()
    out[edge] = colour
    return out
