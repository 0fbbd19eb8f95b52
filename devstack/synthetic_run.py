"""A synthetic, committed mammography batch run written straight into object storage (no model, no engine).

What the merge reads of a real run, with the same keys and checks: ``model/archive.json``,
``model/model.json``, ``model/classifier.npz``, one shard summary, and per item ``result.json``,
``features.npz`` (embedding, pooled, peak, map_shape, cell_size, peak_maps) and ``_complete.json``
listing their sha256. Embeddings come from :class:`devstack.synthetic_embeddings.SyntheticEmbeddings`
(clustered, non-negative, unit length); pooled activations are those vectors scaled, so the unit
atlas and rankings have structure too. For the merge's tests and ``devstack.bench_merge``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from batch import manifest
from batch.items import content_type, json_bytes, npz_bytes
from devstack.synthetic_embeddings import SyntheticEmbeddings
from medxplain_contract.layout import MODEL_RECORD, RunLayout
from medxplain_contract.storage import Bucket, sha256_bytes

CLASSES = ["normal", "benign", "malignant"]
VIEWS_PER_CASE = 4  # two views of two breasts


def item_id(i: int) -> str:
    return f"syn{i:07d}"  # a pseudonym-shaped id; nothing patient-like anywhere


def _rows(n: int, dim: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    data = SyntheticEmbeddings(n, dim, seed=seed, chunk=4096)
    start = 0
    for block in data.chunks():
        for j, row in enumerate(block):
            yield start + j, row
        start += len(block)


def item_objects(i: int, embedding: np.ndarray, seed: int) -> dict[str, bytes]:
    """One item's objects (deterministic in ``i`` and ``seed``), marker included."""
    rng = np.random.default_rng([seed, 7, i])
    dim = embedding.size
    predicted = int(rng.integers(0, len(CLASSES)))
    truth = int(rng.integers(0, len(CLASSES))) if i % 5 else None
    probabilities = rng.dirichlet(np.ones(len(CLASSES)))
    result = {"prediction": {"label": CLASSES[predicted], "label_index": predicted,
                             "probabilities": {c: float(p) for c, p in zip(CLASSES, probabilities)}},
              "target": {"label": CLASSES[predicted], "index": predicted},
              "item": {"id": item_id(i), "case_id": f"case{i // VIEWS_PER_CASE:07d}", "truth": truth}}
    features = {"embedding": embedding.astype(np.float32),
                "pooled": (embedding * 10.0).astype(np.float32),
                "peak": rng.integers(0, 16, size=(dim, 2)).astype(np.int32),
                "map_shape": np.array([16, 16]), "cell_size": np.array([32.0, 32.0]),
                "peak_maps": rng.random((dim, 7, 7)).astype(np.float16)}
    objects = {"result.json": json_bytes(result), "features.npz": npz_bytes(features)}
    objects["_complete.json"] = json_bytes({name: sha256_bytes(data) for name, data in objects.items()})
    return objects


def write_run(bucket: Bucket, prefix: str, n: int, dim: int = 64, seed: int = 0, threads: int = 16) -> None:
    """Every object of a finished (unmerged) run of ``n`` items below ``prefix``."""
    layout = RunLayout(prefix)
    rng = np.random.default_rng(seed)
    bucket.put(layout.model("model.json"), json_bytes({"kind": "ddsm", "name": "ddsm-synthetic", "version": "0",
                                                        "class_names": CLASSES}), "application/json")
    bucket.put(layout.model("classifier.npz"), npz_bytes({"weight": rng.normal(size=(3, dim)).astype(np.float32),
                                                          "bias": np.zeros(3, np.float32)}))
    digest = "0" * 64
    record = {"name": "ddsm-synthetic", "version": "0", "kind": "ddsm", "archive_sha256": digest,
              "archive_digest": digest, "weights_sha256": None, "engine": None}
    bucket.put(layout.key(MODEL_RECORD), json_bytes(record), "application/json")

    def put(i_row: tuple[int, np.ndarray]) -> None:
        i, row = i_row
        for name, data in item_objects(i, row, seed).items():  # the marker last, as a writer commits
            bucket.put(layout.item(item_id(i), name), data, content_type(name))

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, _rows(n, dim, seed), chunksize=64):
            pass
    summary = {"shard": 0, "shards": 1, "items": n, "processed": n, "skipped": 0, "held": 0, "failed": [],
               "started": manifest.now(), "ended": manifest.now(), "archive_sha256": digest,
               "archive_digest": digest, "fingerprint": None, "code_version": manifest.code_version(),
               "truth": "synthetic", "source_items": n, "arguments": {"synthetic": True}}
    bucket.put(layout.shard(0, 1), json_bytes(summary), "application/json")
