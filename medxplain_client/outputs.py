"""Write a response to disk as files a viewer opens: PNG for 2D maps, NIfTI for 3D maps, JSON for the rest.

2D maps become 8-bit greyscale PNGs with their true value range kept in the JSON (``value = min +
pixel / 255 * (max - min)``, the server's own ``png`` encoding); 3D maps are written byte for byte
as sent, so they keep the input scan's affine and their NIfTI value scaling.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image


def write_outputs(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """``{stem}.json`` first, then one file per heatmap / unit map; their ``data`` is replaced by ``file``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = copy.deepcopy(result)
    written: list[Path] = []
    for group, prefix in (("heatmaps", "heatmap"), ("unit_maps", "unit")):
        for name, entry in (summary.get(group) or {}).items():
            if isinstance(entry, dict) and "data" in entry:
                written.append(_write_map(entry, out_dir, f"{stem}.{prefix}-{_safe(name)}"))
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    return [json_path, *written]


def _write_map(entry: dict, out_dir: Path, base: str) -> Path:
    """Write one encoded map and turn its entry into a pointer to the file (in place)."""
    raw = base64.b64decode(entry.pop("data"))
    if entry["encoding"] == "nifti.gz":
        path = out_dir / f"{base}.nii.gz"
        path.write_bytes(raw)
    elif entry["encoding"] == "png":
        path = out_dir / f"{base}.png"
        path.write_bytes(raw)
    elif entry["encoding"] == "float16":
        values = np.frombuffer(raw, dtype=entry.get("dtype", "<f2")).reshape(entry["shape"]).astype(np.float32)
        path = out_dir / f"{base}.png"
        path.write_bytes(_grey_png(values, entry))
    else:
        raise ValueError(f"unknown map encoding {entry['encoding']!r}")
    entry["file"] = path.name
    return path


def _grey_png(values: np.ndarray, entry: dict) -> bytes:
    """Quantise over [min, max] like the server's PNG encoding, and record that scale in the entry."""
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else 1.0
    buf = io.BytesIO()
    Image.fromarray(np.rint((values - lo) / span * 255).astype(np.uint8)).save(buf, format="PNG")
    entry.update(encoding="png", scale={"min": lo, "max": hi})
    entry.pop("dtype", None)
    return buf.getvalue()


def _safe(name: str) -> str:
    """Names come from the server: keep them from escaping ``out_dir``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).lstrip(".") or "map"
