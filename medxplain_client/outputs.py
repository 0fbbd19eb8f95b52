"""Write a response to disk as files a viewer opens: PNG for 2D maps, NIfTI for 3D maps, JSON for the rest.

2D maps become 8-bit greyscale PNGs with their true value range kept in the JSON (``value = min +
pixel / 255 * (max - min)``, the server's own ``png`` encoding); 3D maps are written byte for byte
as sent, so they keep the input scan's affine and their NIfTI value scaling.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from medxplain_contract.encodings import decode_2d, encode_2d, map_bytes, map_suffix


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
    raw = map_bytes(entry)
    entry.pop("data")
    if entry["encoding"] == "float16":  # no viewer opens raw float16: the server's png encoding instead
        png = encode_2d(decode_2d(entry, raw), "png")
        entry.update(encoding="png", scale=png["scale"])
        entry.pop("dtype", None)
        raw = map_bytes(png)
    path = out_dir / f"{base}{map_suffix(entry['encoding'])}"
    path.write_bytes(raw)
    entry["file"] = path.name
    return path


def _safe(name: str) -> str:
    """Names come from the server: keep them from escaping ``out_dir``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).lstrip(".") or "map"
