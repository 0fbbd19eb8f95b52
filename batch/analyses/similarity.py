"""Cosine top-k neighbours over the run's embeddings, images of the same case excluded.

Up to ``ann_threshold`` items: exact search, one matrix product per block of rows plus
``argpartition`` (no library: FAISS's exact index is not faster on CPU, and the matrix of a run
this small fits in memory). Above it: the FAISS IVF-Flat index of :mod:`batch.analyses.ann`, built
from the on-disk rows in chunks, stored as ``index/ann.faiss`` and used for every item's stored
top-k too (exact all-pairs is O(n^2): hours at 10^6). The precomputed top-k of every item is
stored in ``index/similarity.json`` so the UI shows neighbours without touching the matrix; the
query side (:class:`SimilarityIndex`) is in :mod:`medxplain_contract.similarity`, so the UI reads
the index without importing batch. similarity.json is written piece by piece: at 10^6 items it is
hundreds of MB, and the merge holds no more than a chunk of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from batch.analyses.ann import DEFAULT_THRESHOLD, build_ivf, write_index
from batch.analyses.embeddings import EmbeddingStore
from medxplain_contract.integrity import sha256_file
from medxplain_contract.layout import ANN_INDEX, RunLayout
from medxplain_contract.similarity import FORMAT, Neighbour, SimilarityIndex, top_k

__all__ = ["FORMAT", "Neighbour", "SimilarityIndex", "all_neighbours", "top_k", "write_similarity"]

BLOCK_ELEMENTS = 1 << 23  # scores per block of the all-pairs product: 32 MB float32 (+ 64 MB argpartition indices)
SEARCH_ROWS = 4096  # rows per batched ANN search when storing every item's top-k
_REL = RunLayout("")


def all_neighbours(matrix: np.ndarray, case_codes: np.ndarray, k: int,
                   rows: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Exact top-k of every row (or the first ``rows``) against all rows, same case (and itself) excluded."""
    cols_out: list[list[int]] = []
    vals_out: list[list[float]] = []
    for cols, vals in _exact_blocks(matrix, case_codes, k, rows):
        cols_out.extend(cols)
        vals_out.extend(vals)
    return cols_out, vals_out


def _exact_blocks(matrix: np.ndarray, case_codes: np.ndarray, k: int, rows: int | None = None):
    step = max(16, BLOCK_ELEMENTS // max(1, matrix.shape[0]))
    end = matrix.shape[0] if rows is None else min(rows, matrix.shape[0])
    for start in range(0, end, step):
        block = slice(start, min(start + step, end))
        scores = matrix[block] @ matrix.T
        scores[case_codes[block, None] == case_codes[None, :]] = -np.inf
        yield _lists(*top_k(scores, k))


def _lists(cols: np.ndarray, vals: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    keep = np.isfinite(vals) & (cols >= 0)
    return ([c[m].tolist() for c, m in zip(cols, keep)],
            [[round(float(x), 6) for x in v[m]] for v, m in zip(vals, keep)])


def _ann_blocks(store: EmbeddingStore, search, codes: np.ndarray, k: int):
    start = 0
    for block in store.chunks(SEARCH_ROWS):
        yield _lists(*search.search(block, k, exclude_codes=codes[start:start + len(block)]))
        start += len(block)


def write_similarity(store: EmbeddingStore, folder: Path, k: int = 20,
                     ann_threshold: int = DEFAULT_THRESHOLD) -> tuple[dict[str, Path], dict]:
    """index/similarity.json (and index/ann.faiss above the threshold) as files; and a summary."""
    from medxplain_contract.ann import AnnSearch

    codes = store.codes()
    header: dict = {"format": FORMAT, "metric": "cosine", "search": "exact", "k": k,
                    "excludes": "items of the same case_id (and the item itself)"}
    files: dict[str, Path] = {}
    summary: dict = {"search": "exact"}
    if store.n > ann_threshold:
        built = build_ivf(store.chunks, store.n, store.dim or 0, k=k)
        ann_path = write_index(built.index, folder / ANN_INDEX)
        files[_REL.index(ANN_INDEX)] = ann_path
        record = {**built.record(), "object": _REL.index(ANN_INDEX), "sha256": sha256_file(ann_path)}
        header["search"] = "ann"
        header["ann"] = record
        summary = {"search": "ann", "ann": {k: record[k] for k in ("kind", "nlist", "nprobe", "recall_at_k")},
                   "ann_threshold": ann_threshold}
        blocks = _ann_blocks(store, AnnSearch(built.index, built.nprobe, codes), codes, k)
    else:
        blocks = _exact_blocks(store.matrix(), codes, k) if store.n else iter(())
    path = folder / "similarity.json"
    scores_path = folder / "similarity.scores.part"
    with open(path, "w", encoding="utf-8") as out, open(scores_path, "w", encoding="utf-8") as scores:
        # the same bytes as json.dumps(whole object, separators=(",", ":")), written as it is computed
        out.write(json.dumps(header, separators=(",", ":"))[:-1] + ',"items":[')
        out.writelines(("," if i else "") + json.dumps(item, separators=(",", ":")) for i, item in enumerate(store.table()))
        out.write('],"neighbours":[')
        first = True
        for cols, vals in blocks:
            for c, v in zip(cols, vals):
                sep = "" if first else ","
                out.write(sep + json.dumps(c, separators=(",", ":")))
                scores.write(sep + json.dumps(v, separators=(",", ":"), allow_nan=False))
                first = False
        out.write('],"scores":[')
    with open(path, "a", encoding="utf-8") as out, open(scores_path, encoding="utf-8") as scores:
        while part := scores.read(1 << 20):
            out.write(part)
        out.write("]}")
    scores_path.unlink()
    files[_REL.index("similarity.json")] = path
    return files, summary
