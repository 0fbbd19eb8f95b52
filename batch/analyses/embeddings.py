"""The run's embedding matrix: one float32 row per item, in a fixed item order, plus the ids."""

from __future__ import annotations

import io

import numpy as np

from batch.records import ItemRecord
from medxplain_contract.similarity import load_npy

__all__ = ["embedding_matrix", "load_npy", "npy_bytes"]


def embedding_matrix(records: list[ItemRecord]) -> tuple[list[str], np.ndarray]:
    """Ids and the (items, units) matrix of features["embedding"] (L2-normalised by the engine)."""
    ids = [r.item_id for r in records]
    if not records:
        return ids, np.zeros((0, 0), np.float32)
    return ids, np.stack([np.asarray(r.features["embedding"], np.float32).ravel() for r in records])


def npy_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(matrix), allow_pickle=False)
    return buf.getvalue()

