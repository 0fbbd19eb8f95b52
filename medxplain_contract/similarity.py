"""Query side of a run's similarity index: stored top-k neighbours, exact or approximate cosine queries.

The batch merge builds ``index/similarity.json`` (+ ``index/embeddings.npy``, ``index/ids.json``,
and ``index/ann.faiss`` for runs above its size threshold; ``batch.analyses.similarity``); this
module reads them back for the UI without importing batch. Small runs: exact search, one matrix
product plus ``argpartition`` (no library: FAISS's exact index is not faster for single queries on
CPU, ~1 ms per query at 10k x 512). Large runs: the FAISS IVF index (:mod:`medxplain_contract.ann`),
verified against the sha256 similarity.json records for it before FAISS parses it; the embedding
matrix is then not needed (IVF-Flat holds the vectors). Runs without an ANN index stay exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from medxplain_contract.arrays import load_npy

FORMAT = 1
_BLAS = ThreadpoolController()


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


class SimilarityIndex:
    """Query side, loaded from the run's objects (the UI's entry point)."""

    def __init__(self, items: list[dict], matrix: np.ndarray | None, neighbours: list[list[int]],
                 scores: list[list[float]], k: int, ann=None) -> None:
        self.items = items
        self.matrix = matrix
        self.k = k
        self.ann = ann  # medxplain_contract.ann.AnnSearch, or None: exact search over the matrix
        self._neighbours, self._scores = neighbours, scores
        self._row = {item["id"]: i for i, item in enumerate(items)}
        cases, codes = np.unique(np.asarray([item["case_id"] for item in items], dtype=str), return_inverse=True)
        self._case_codes = codes
        self._case_code = {str(c): i for i, c in enumerate(cases)}

    @classmethod
    def from_objects(cls, similarity_json: bytes, embeddings_npy: bytes | None = None,
                     ids_json: bytes | None = None, ann_index: bytes | None = None) -> SimilarityIndex:
        """similarity.json alone serves stored neighbours; with embeddings.npy or (large runs) the
        ANN index it also answers queries. A tampered ANN index raises IntegrityError."""
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
        index = cls(data["items"], matrix, data["neighbours"], data["scores"], int(data["k"]))
        if ann_index is not None:
            from medxplain_contract.ann import AnnSearch, load_index

            record = data.get("ann")
            if not record:
                raise ValueError("an ANN index was given but similarity.json records none")
            faiss_index = load_index(ann_index, record.get("sha256"), record.get("object", "index/ann.faiss"))
            index.ann = AnnSearch(faiss_index, int(record["nprobe"]), index._case_codes)
        return index

    def __len__(self) -> int:
        return len(self.items)

    @property
    def can_query(self) -> bool:
        """Ad-hoc queries need the matrix (exact) or the ANN index (large runs)."""
        return self.matrix is not None or self.ann is not None

    @property
    def dim(self) -> int | None:
        """Length of the run's embeddings (None when neither matrix nor index is loaded)."""
        if self.ann is not None:
            return int(self.ann.index.d)
        return None if self.matrix is None else int(self.matrix.shape[1])

    def _result(self, rows, scores) -> list[Neighbour]:
        out = []
        for r, s in zip(rows, scores):
            item = self.items[int(r)]
            out.append(Neighbour(item["id"], float(s), item["case_id"], item.get("truth"), item["predicted"]))
        return out

    def neighbours(self, item_id: str, k: int = 20) -> list[Neighbour]:
        """The item's top-k of the run (same case excluded); stored ones when k <= the stored k."""
        row = self._row[item_id]
        if k <= self.k or (self.matrix is None and self.ann is None):
            return self._result(self._neighbours[row][:k], self._scores[row][:k])
        vector = self.ann.vector(row) if self.ann is not None else self.matrix[row]
        return self.query(vector, k, exclude_case=self.items[row]["case_id"])

    def query(self, embedding: np.ndarray, k: int = 20, exclude_case: str | None = None) -> list[Neighbour]:
        """Top-k items by cosine to any embedding (normalised here), optionally without one case's items.

        Through the ANN index when the run has one (approximate: recall@k as similarity.json records),
        else exact over the matrix.
        """
        if self.matrix is None and self.ann is None:
            raise ValueError("queries need the embedding matrix or the ANN index: pass one to from_objects")
        vector = np.asarray(embedding, np.float32).ravel()
        norm = float(np.linalg.norm(vector))
        if self.ann is not None:
            code = self._case_code.get(exclude_case) if exclude_case is not None else None
            rows, vals = self.ann.search((vector / norm if norm > 0 else vector)[None], k,
                                         None if code is None else np.array([code]))
            keep = np.isfinite(vals[0]) & (rows[0] >= 0)
            return self._result(rows[0][keep], vals[0][keep])
        # One BLAS thread: a matrix-vector product is memory-bound, and OpenBLAS's spinning second
        # thread made it ~5x slower on a busy 2-core host (measured, devstack/bench_similarity.py's exact timing).
        with _BLAS.limit(limits=1, user_api="blas"):
            scores = (self.matrix @ (vector / norm if norm > 0 else vector))[None]
        if exclude_case is not None:
            code = self._case_code.get(exclude_case)
            if code is not None:
                scores[0, self._case_codes == code] = -np.inf
        cols, vals = top_k(scores, k)
        keep = np.isfinite(vals[0])
        return self._result(cols[0][keep], vals[0][keep])
