"""Small helpers shared by the analyses: class of an item, JSON bytes."""

from __future__ import annotations

import json

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


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
