"""Heatmap overlays with NumPy/PIL (``st.image`` has none).

Images, volumes and maps are decoded by the contract (``medxplain_contract.decoding`` and
``.encodings``), the same code the model's input and the batch job go through, so the UI shows
exactly what was analysed (DICOM modality and VOI LUTs included).
"""

from __future__ import annotations

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


def shown_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 display of the contract decoder's [0, 1] pixels: the model's own grey levels, no re-windowing."""
    return to_uint8(pixels, 0.0, 1.0)


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
