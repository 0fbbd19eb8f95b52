"""Exact cosine top-k neighbours over the run's embeddings, images of the same case excluded.

Exact search is one matrix product plus ``argpartition`` (no library: FAISS's exact index is not
faster for single queries on CPU and the shared notes measured ~1 ms per query at 10k x 512). The
precomputed top-k of every item is stored in ``index/similarity.json`` so the UI shows neighbours
without touching the matrix; ad-hoc queries use the matrix from ``index/embeddings.npy``. The query
side (:class:`SimilarityIndex`) is in :mod:`medxplain_contract.similarity`, so the UI reads the
index without importing batch.
"""

from __future__ import annotations

import numpy as np

from batch.analyses.common import dumps
from medxplain_contract.similarity import FORMAT, Neighbour, SimilarityIndex, top_k

__all__ = ["FORMAT", "Neighbour", "SimilarityIndex", "all_neighbours", "build_similarity", "top_k"]

BLOCK_ELEMENTS = 1 << 23  # scores per block of the all-pairs product: 32 MB float32 (+ 64 MB argpartition indices)


def all_neighbours(matrix: np.ndarray, case_codes: np.ndarray, k: int,
                   rows: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Exact top-k of every row (or the first ``rows``) against all rows, same case (and itself) excluded."""
    cols_out: list[list[int]] = []
    vals_out: list[list[float]] = []
    step = max(16, BLOCK_ELEMENTS // max(1, matrix.shape[0]))
    end = matrix.shape[0] if rows is None else min(rows, matrix.shape[0])
    for start in range(0, end, step):
        block = slice(start, min(start + step, end))
        scores = matrix[block] @ matrix.T
        scores[case_codes[block, None] == case_codes[None, :]] = -np.inf
        cols, vals = top_k(scores, k)
        for c, v in zip(cols, vals):
            keep = np.isfinite(v)
            cols_out.append(c[keep].tolist())
            vals_out.append([round(float(x), 6) for x in v[keep]])
    return cols_out, vals_out


def build_similarity(ids: list[str], matrix: np.ndarray, case_ids: list[str], truth: list[str | None],
                     predicted: list[str], k: int = 20) -> bytes:
    """index/similarity.json: the items table and each item's top-k (row numbers into it + scores)."""
    _, codes = np.unique(np.asarray(case_ids, dtype=str), return_inverse=True)
    cols, vals = all_neighbours(matrix.astype(np.float32, copy=False), codes, k) if ids else ([], [])
    return dumps({"format": FORMAT, "metric": "cosine", "search": "exact", "k": k,
                  "excludes": "items of the same case_id (and the item itself)",
                  "items": [{"id": i, "case_id": c, "truth": t, "predicted": p}
                            for i, c, t, p in zip(ids, case_ids, truth, predicted)],
                  "neighbours": cols, "scores": vals})
