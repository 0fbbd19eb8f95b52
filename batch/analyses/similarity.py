"""Exact cosine top-k neighbours over the run's embeddings, images of the same case excluded.

Exact search is one matrix product plus ``argpartition`` (no library: FAISS's exact index is not
faster for single queries on CPU and the shared notes measured ~1 ms per query at 10k x 512). The
precomputed top-k of every item is stored in ``index/similarity.json`` so the UI shows neighbours
without touching the matrix; ad-hoc queries use the matrix from ``index/embeddings.npy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from batch.analyses.common import dumps
from batch.analyses.embeddings import load_npy

FORMAT = 1
_BLAS = ThreadpoolController()
BLOCK_ELEMENTS = 1 << 23  # scores per block of the all-pairs product: 32 MB float32 (+ 64 MB argpartition indices)


@dataclass(frozen=True)
class Neighbour:
    item_id: str
    score: float  # cosine similarity
    case_id: str
    truth: str | None  # ground-truth class name, None when unknown
    predicted: str  # predicted class name


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest scores (descending) and their columns; -inf entries are dropped later."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.int64), np.zeros((scores.shape[0], 0), scores.dtype)
    cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


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


class SimilarityIndex:
    """Query side, loaded from the run's objects (the UI's entry point)."""

    def __init__(self, items: list[dict], matrix: np.ndarray | None, neighbours: list[list[int]],
                 scores: list[list[float]], k: int) -> None:
        self.items = items
        self.matrix = matrix
        self.k = k
        self._neighbours, self._scores = neighbours, scores
        self._row = {item["id"]: i for i, item in enumerate(items)}
        cases, codes = np.unique(np.asarray([item["case_id"] for item in items], dtype=str), return_inverse=True)
        self._case_codes = codes
        self._case_code = {str(c): i for i, c in enumerate(cases)}

    @classmethod
    def from_objects(cls, similarity_json: bytes, embeddings_npy: bytes | None = None,
                     ids_json: bytes | None = None) -> SimilarityIndex:
        """similarity.json alone serves stored neighbours; with embeddings.npy it also answers queries."""
        data = json.loads(similarity_json)
        if data.get("format") != FORMAT:
            raise ValueError(f"unsupported similarity index format {data.get('format')!r}")
        matrix = None
        if embeddings_npy is not None:
            matrix = load_npy(embeddings_npy).astype(np.float32, copy=False)
            if matrix.shape[0] != len(data["items"]):
                raise ValueError("embeddings.npy and similarity.json list different numbers of items")
            if ids_json is not None and json.loads(ids_json) != [it["id"] for it in data["items"]]:
                raise ValueError("ids.json and similarity.json list different items")
        return cls(data["items"], matrix, data["neighbours"], data["scores"], int(data["k"]))

    def __len__(self) -> int:
        return len(self.items)

    def _result(self, rows, scores) -> list[Neighbour]:
        out = []
        for r, s in zip(rows, scores):
            item = self.items[int(r)]
            out.append(Neighbour(item["id"], float(s), item["case_id"], item.get("truth"), item["predicted"]))
        return out

    def neighbours(self, item_id: str, k: int = 20) -> list[Neighbour]:
        """The item's top-k of the run (same case excluded); stored ones when k <= the stored k."""
        row = self._row[item_id]
        if k <= self.k or self.matrix is None:
            return self._result(self._neighbours[row][:k], self._scores[row][:k])
        return self.query(self.matrix[row], k, exclude_case=self.items[row]["case_id"])

    def query(self, embedding: np.ndarray, k: int = 20, exclude_case: str | None = None) -> list[Neighbour]:
        """Top-k items by cosine to any embedding (normalised here), optionally without one case's items."""
        if self.matrix is None:
            raise ValueError("queries need the embedding matrix: pass embeddings_npy to from_objects")
        vector = np.asarray(embedding, np.float32).ravel()
        norm = float(np.linalg.norm(vector))
        # One BLAS thread: a matrix-vector product is memory-bound, and OpenBLAS's spinning second
        # thread made it ~5x slower on a busy 2-core host (measured, batch/analyses/bench_similarity.py).
        with _BLAS.limit(limits=1, user_api="blas"):
            scores = (self.matrix @ (vector / norm if norm > 0 else vector))[None]
        if exclude_case is not None:
            code = self._case_code.get(exclude_case)
            if code is not None:
                scores[0, self._case_codes == code] = -np.inf
        cols, vals = top_k(scores, k)
        keep = np.isfinite(vals[0])
        return self._result(cols[0][keep], vals[0][keep])
