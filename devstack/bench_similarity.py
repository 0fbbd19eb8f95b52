"""ANN vs exact similarity search on synthetic CNN-like embeddings: ``python -m devstack.bench_similarity``.

Per size (items x dims): builds the merge's IVF-Flat index (``batch.analyses.ann.build_ivf``: train,
add in chunks, nprobe chosen by measured recall), then measures on held-out query rows, in the same
run: recall@k of the index against exact search (at the chosen nprobe and at each swept nprobe),
query time p50/p95 per query single-query (the UI's case) and batched, the exact matrix-vector
query time for comparison (when the matrix fits, see --exact-max-gib), build time and index size.
Vectors: ``devstack.synthetic_embeddings`` (clustered, low intrinsic dimension, non-negative, unit
length: uniform Gaussians have no neighbour structure). 10^6 x 2048 is 8 GiB of vectors inside the
index alone: only with ``--big``. One JSON line per size; times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from batch.analyses.ann import build_ivf, exact_top_k, recall, write_index
from devstack.synthetic_embeddings import SPREAD, SyntheticEmbeddings
from medxplain_contract.ann import AnnSearch


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def bench(n: int, dim: int, queries: int, k: int, batch: int, nlist: int | None, sweep: list[int],
          exact_max_gib: float, spread: float, seed: int = 0) -> dict:
    import faiss

    data = SyntheticEmbeddings(n, dim, seed=seed, spread=spread)
    started = time.perf_counter()
    built = build_ivf(data.chunks, n, dim, k=k, nlist=nlist, seed=seed)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:  # the stored object's size
        size = write_index(built.index, Path(folder) / "ann.faiss").stat().st_size
    # queries: rows of a second draw with another seed (same clusters, not in the index)
    q = SyntheticEmbeddings(queries, dim, seed=seed, spread=spread, draw=1).matrix()
    truth = exact_top_k(data.chunks, q, k)
    search = AnnSearch(built.index, built.nprobe, np.arange(n))
    single, found = [], np.zeros((len(q), k), np.int64)
    faiss.omp_set_num_threads(1)  # one query at a time: what a UI request does
    for i in range(len(q)):
        t = time.perf_counter()
        found[i] = search.search(q[i:i + 1], k)[0][0]
        single.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    batched = []
    for start in range(0, len(q), batch):
        t = time.perf_counter()
        search.search(q[start:start + batch], k)
        batched.append((time.perf_counter() - t) / len(q[start:start + batch]))
    swept = {}
    for probe in sweep:
        if probe <= built.nlist:
            s = AnnSearch(built.index, probe, np.arange(n))
            t = time.perf_counter()
            rows = s.search(q, k)[0]
            swept[probe] = {"recall": round(recall(rows, truth), 4),
                            "batched_ms_per_query": round((time.perf_counter() - t) / len(q) * 1000, 3)}
    out = {"items": n, "dim": dim, "k": k, "queries": len(q), "vectors": f"synthetic clustered, spread {spread}",
           "index": "IVFFlat", "nlist": built.nlist, "nprobe": built.nprobe,
           "calibration_recall": round(built.recall, 4), f"recall_at_{k}": round(recall(found, truth), 4),
           "single_query": _percentiles(single), "batched_per_query": _percentiles(batched), "batch": batch,
           "build_s": round(build_s, 1), "index_bytes": size, "index_mib": round(size / 2**20, 1),
           "nprobe_sweep": swept}
    del built, search
    if n * dim * 4 <= exact_max_gib * 2**30:  # the exact path holds the matrix, as the UI does for small runs
        matrix = data.matrix()
        exact = []
        for i in range(len(q)):
            t = time.perf_counter()
            scores = matrix @ q[i]
            np.argpartition(-scores, k - 1)[:k]
            exact.append(time.perf_counter() - t)
        out["exact_single_query"] = _percentiles(exact)
        out["speedup_p50"] = round(out["exact_single_query"]["p50_ms"] / max(out["single_query"]["p50_ms"], 1e-6), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated item counts (default 100000)")
    parser.add_argument("--dims", default="512", help="comma-separated dimensions (default 512)")
    parser.add_argument("--full", action="store_true", help="sizes 100000,1000000 and dims 512,2048 "
                        "(10^6 x 2048 still needs --big)")
    parser.add_argument("--big", action="store_true", help="also run 10^6 x 2048 (8 GiB of vectors in the index)")
    parser.add_argument("--queries", type=int, default=500, help="held-out query vectors (default 500)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="queries per batched search (default 64)")
    parser.add_argument("--nlist", type=int, default=None, help="override the merge's nlist rule")
    parser.add_argument("--sweep", default="8,16,32,64,128", help="nprobe values whose recall is also printed")
    parser.add_argument("--spread", type=float, default=SPREAD, help="within-cluster spread of the vectors")
    parser.add_argument("--exact-max-gib", type=float, default=2.5,
                        help="time exact queries only when the matrix is at most this big (default 2.5)")
    args = parser.parse_args()
    sizes = [100_000, 1_000_000] if args.full else [int(s) for s in args.sizes.split(",")]
    dims = [512, 2048] if args.full else [int(d) for d in args.dims.split(",")]
    sweep = [int(p) for p in args.sweep.split(",") if p]
    for n in sizes:
        for dim in dims:
            if n * dim >= 1_000_000 * 2048 and not args.big:
                print(json.dumps({"items": n, "dim": dim, "skipped": "8 GiB of vectors: pass --big"}), flush=True)
                continue
            print(json.dumps(bench(n, dim, args.queries, args.k, args.batch, args.nlist, sweep,
                                   args.exact_max_gib, args.spread)), flush=True)


if __name__ == "__main__":
    main()
