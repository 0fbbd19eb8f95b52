"""Exact-search timing on random unit vectors: ``python -m batch.analyses.bench_similarity``.

Measures what the UI pays per ad-hoc query (SimilarityIndex.query: one matrix-vector product,
same-case mask, argpartition) and what the merge step pays to precompute every item's top-k
(timed on the first --build-rows items against all, scaled to all items).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from batch.analyses.common import dumps
from batch.analyses.embeddings import npy_bytes
from batch.analyses.similarity import SimilarityIndex, all_neighbours


def bench(n: int, dim: int, queries: int, build_rows: int, k: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    items = [{"id": f"i{i}", "case_id": f"c{i // 4}", "truth": None, "predicted": "x"} for i in range(n)]
    similarity = dumps({"format": 1, "k": k, "items": items, "neighbours": [[]] * n, "scores": [[]] * n})
    index = SimilarityIndex.from_objects(similarity, npy_bytes(matrix))
    index.query(matrix[0], k, exclude_case="c0")  # warm-up
    started = time.perf_counter()
    for q in rng.integers(0, n, queries):
        index.query(matrix[q], k, exclude_case=f"c{q // 4}")
    per_query = (time.perf_counter() - started) / queries
    rows = min(build_rows, n)
    codes = np.arange(n) // 4
    started = time.perf_counter()
    # the first `rows` items against all: the build is the same work per row for every row
    all_neighbours(matrix, codes, k, rows=rows)
    build = (time.perf_counter() - started) / rows * n
    return {"items": n, "dim": dim, "query_ms": round(per_query * 1000, 2), "queries": queries,
            "build_all_topk_s": round(build, 1), "build_timed_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--build-rows", type=int, default=2048)
    args = parser.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(bench(n, args.dim, args.queries, args.build_rows)), flush=True)


if __name__ == "__main__":
    main()
