"""Query side of a run's approximate (FAISS) similarity index: ``index/ann.faiss``.

Runs above the merge's size threshold (``batch.analyses.ann``) store an IVF-Flat index over the
L2-normalised embeddings, inner product (= cosine, the run's similarity metric). IVF-Flat keeps
the full vectors, so scores of what it returns are exact and recall depends on ``nprobe`` alone; the
merge measured recall@k against exact search at the ``nprobe`` it recorded in ``similarity.json``.
The object is verified against its recorded sha256 before FAISS parses it (a FAISS file is a binary
format read by C++ code: nothing unchecked reaches the parser).
"""

from __future__ import annotations

import numpy as np

from medxplain_contract.checksums import verified

ANN_FORMAT = 1


def _faiss():
    import faiss  # imported on first use: runs without an ANN index never need it

    return faiss


def load_index(data: bytes, expected_sha256: str | None, key: str):
    """The FAISS index in ``data`` once it hashes to ``expected_sha256`` (IntegrityError otherwise)."""
    faiss = _faiss()
    verified(key, data, expected_sha256)
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class AnnSearch:
    """Top-k by inner product through an IVF index, items of an excluded case removed exactly.

    Same-case exclusion over-fetches by the largest case's size, so the k returned are the index's
    best k outside the case (a filter inside FAISS would do the same work less transparently).
    """

    def __init__(self, index, nprobe: int, case_codes: np.ndarray) -> None:
        faiss = _faiss()
        self.index = index
        self.nprobe = int(nprobe)
        self.case_codes = np.asarray(case_codes, np.int64)
        self.largest_case = int(np.bincount(self.case_codes).max()) if len(self.case_codes) else 0
        self._params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        if index.ntotal != len(self.case_codes):
            raise ValueError("the ANN index and similarity.json list different numbers of items")

    def search(self, vectors: np.ndarray, k: int,
               exclude_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores), each (queries, k), best first; padded with -1 / -inf when fewer are found."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        fetch = min(k + (self.largest_case if exclude_codes is not None else 0), self.index.ntotal)
        rows_out = np.full((len(queries), k), -1, np.int64)
        vals_out = np.full((len(queries), k), -np.inf, np.float32)
        if fetch == 0 or len(queries) == 0:
            return rows_out, vals_out
        vals, rows = self.index.search(queries, fetch, params=self._params)
        keep = rows >= 0
        if exclude_codes is not None:
            codes = np.where(keep, self.case_codes[np.maximum(rows, 0)], -1)
            keep &= codes != np.asarray(exclude_codes, np.int64)[:, None]
        for q in range(len(queries)):  # FAISS returns each row sorted; keep the first k kept
            chosen = np.flatnonzero(keep[q])[:k]
            rows_out[q, :len(chosen)] = rows[q, chosen]
            vals_out[q, :len(chosen)] = vals[q, chosen]
        return rows_out, vals_out

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of a row (IVF-Flat keeps the vectors; the build made the direct map)."""
        return self.index.reconstruct(int(row))
