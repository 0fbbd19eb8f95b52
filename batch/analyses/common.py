"""Small helpers shared by the analyses: class of an item, JSON bytes."""

from __future__ import annotations

import json
import math

from batch.records import ItemRecord, ModelInfo


def truth_index(record: ItemRecord, model: ModelInfo) -> int | None:
    """Ground truth as a class index; the job may store it as an index or as a class name."""
    truth = record.truth
    if truth is None:
        return None
    if isinstance(truth, str):
        return model.class_names.index(truth) if truth in model.class_names else int(truth)
    return int(truth)


def group_class(record: ItemRecord, model: ModelInfo) -> tuple[int, str]:
    """The class an item is counted under: ground truth when known, else the prediction (and which)."""
    truth = truth_index(record, model)
    return (truth, "truth") if truth is not None else (record.predicted, "predicted")


def class_source(counts: dict[str, int]) -> str:
    """'truth', 'predicted' or 'mixed': what the per-class groups of an object were built from."""
    used = [k for k, n in counts.items() if n]
    return used[0] if len(used) == 1 else ("mixed" if used else "none")


def dumps(obj, indent: int | None = None) -> bytes:
    """Strict JSON (browsers reject NaN); a non-finite number becomes null rather than failing the merge."""
    try:
        return json.dumps(obj, indent=indent, separators=None if indent else (",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(obj), indent=indent, separators=None if indent else (",", ":"),
                          allow_nan=False).encode()


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
