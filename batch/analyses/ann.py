"""Build side of the approximate similarity index of large runs (FAISS IVF-Flat, inner product).

Below ``DEFAULT_THRESHOLD`` items the run keeps exact search only (one matrix product per query,
~1 ms at 10^4 x 512). Above it the merge trains an IVF-Flat index on a spread sample of the rows,
adds every row in chunks read from disk, and picks ``nprobe`` by measurement: the smallest of
``NPROBES`` whose recall@k against exact search on ``CALIBRATION_QUERIES`` items reaches
``TARGET_RECALL``. IVF-Flat rather than HNSW: it builds in one k-means plus one assignment pass
(HNSW took many times longer to build on two cores, devstack.bench_similarity), stores exact
vectors (so returned scores are exact and ``neighbours(k > stored k)`` needs no second copy of the
matrix), and its one knob trades recall for time predictably. Spherical k-means: the vectors are
unit length and the metric is cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxplain_contract.similarity import top_k

DEFAULT_THRESHOLD = 50_000  # items; below it exact search is fast enough (and exact)
NPROBES = (4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
TARGET_RECALL = 0.99
CALIBRATION_QUERIES = 200
TRAIN_PER_LIST = 40  # k-means sample: 40 points per list (FAISS warns below 39)
KMEANS_ITERATIONS = 10

Chunks = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the rows, in order, as float32 blocks


def choose_nlist(n: int) -> int:
    """Lists: the power of two nearest sqrt(n) (10^5 -> 256, 10^6 -> 1024), at least 16, <= n / 40."""
    nlist = 2 ** round(float(np.log2(max(np.sqrt(max(n, 1)), 1.0))))
    return int(max(1, min(max(16, nlist), n // TRAIN_PER_LIST)))


@dataclass
class AnnBuild:
    index: object  # faiss.IndexIVFFlat
    nlist: int
    nprobe: int
    recall: float  # measured recall@k at nprobe on the calibration queries
    recall_by_nprobe: dict[int, float]
    k: int
    calibration_queries: int

    def record(self) -> dict:
        """What similarity.json records about the index (sha256 added by the writer)."""
        return {"format": 1, "kind": "IVFFlat", "metric": "inner_product (cosine of unit vectors)",
                "nlist": self.nlist, "nprobe": self.nprobe, "k": self.k,
                "recall_at_k": round(self.recall, 4), "target_recall": TARGET_RECALL,
                "calibration_queries": self.calibration_queries,
                "recall_by_nprobe": {str(p): round(r, 4) for p, r in self.recall_by_nprobe.items()}}


def rows_at(chunks: Chunks, wanted: np.ndarray) -> np.ndarray:
    """The rows at sorted indices ``wanted``, gathered in one pass."""
    out, start, parts = np.asarray(wanted, np.int64), 0, []
    for block in chunks():
        inside = out[(out >= start) & (out < start + len(block))]
        if len(inside):
            parts.append(block[inside - start])
        start += len(block)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def exact_top_k(chunks: Chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows of each query over every row (one pass; a running top-k per chunk)."""
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_vals = np.zeros((len(queries), 0), np.float32)
    start = 0
    for block in chunks():
        scores = np.concatenate([best_vals, queries @ block.T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + len(block)),
                                                          (len(queries), len(block)))], axis=1)
        cols, best_vals = top_k(scores, k)
        best_rows = np.take_along_axis(rows, cols, axis=1)
        start += len(block)
    return best_rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k found (set overlap per query, averaged)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) / max(1, len(t)) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def build_ivf(chunks: Chunks, n: int, dim: int, k: int = 20, nlist: int | None = None,
              nprobe: int | None = None, seed: int = 0) -> AnnBuild:
    """Train, add every row (in chunks), and choose nprobe by measured recall unless one is given."""
    import faiss

    nlist = nlist or choose_nlist(n)
    train_rows = np.unique(np.linspace(0, n - 1, min(n, nlist * TRAIN_PER_LIST)).astype(np.int64))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERATIONS
    index.train(np.ascontiguousarray(rows_at(chunks, train_rows), np.float32))
    for block in chunks():
        index.add(np.ascontiguousarray(block, np.float32))
    index.make_direct_map()  # reconstruct(row): the UI's neighbours(k > stored k)
    calib = np.unique(np.random.default_rng(seed).choice(n, min(n, CALIBRATION_QUERIES), replace=False))
    queries = rows_at(chunks, calib)
    truth = exact_top_k(chunks, queries, min(k, n))
    by_nprobe: dict[int, float] = {}
    for probe in ([nprobe] if nprobe else [p for p in NPROBES if p <= nlist] or [nlist]):
        _, found = index.search(queries, min(k, n), params=faiss.SearchParametersIVF(nprobe=probe))
        by_nprobe[probe] = recall(found, truth)
        if by_nprobe[probe] >= TARGET_RECALL:
            break
    chosen = next((p for p, r in by_nprobe.items() if r >= TARGET_RECALL), max(by_nprobe))
    return AnnBuild(index, nlist, chosen, by_nprobe[chosen], by_nprobe, k, len(calib))


def write_index(index, path: Path) -> Path:
    """The index in FAISS's own format, straight to a file (serialising to memory would double it)."""
    import faiss

    faiss.write_index(index, str(path))
    return Path(path)
