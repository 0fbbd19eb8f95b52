"""Hospital-scale similarity and merge: the FAISS index built by the merge, its integrity, the streaming merge.

Runs are synthetic (devstack.synthetic_run: the objects a batch writer commits, clustered CNN-like
embeddings) in a real MinIO; the merge is the real one, with the ANN size threshold lowered so a
few hundred items take the large-run path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from batch.analyses import build_run_outputs
from batch.merge import merge_run, read_model, read_records
from devstack.synthetic_run import item_id, write_run
from medxplain_contract.ann import AnnSearch
from medxplain_contract.checksums import IntegrityError
from medxplain_contract.runs import RunReader
from medxplain_contract.similarity import SimilarityIndex, load_npy
from medxplain_contract.storage import Bucket

N, DIM, K = 600, 32, 10


@pytest.fixture(scope="module")
def bucket(minio_server) -> Bucket:
    out = Bucket(minio_server.admin_config(), "scale-test")
    out.ensure(create=True)
    return out


def _merge(bucket: Bucket, prefix: str, **kwargs) -> dict:
    return merge_run(f"s3://{bucket.name}/{prefix}", s3=bucket.config, **kwargs)


@pytest.fixture(scope="module")
def ann_run(bucket) -> str:
    write_run(bucket, "runs/ann", N, DIM, seed=3)
    _merge(bucket, "runs/ann", ann_threshold=N // 2)
    return "runs/ann"


def _exact(matrix: np.ndarray, cases: np.ndarray, query: np.ndarray, k: int, exclude: str | None) -> list[int]:
    """Independent brute force: every item by cosine, the excluded case's items dropped."""
    scores = matrix @ (query / np.linalg.norm(query))
    order = [int(j) for j in np.argsort(-scores, kind="stable") if exclude is None or cases[j] != exclude]
    return order[:k]


def test_merge_builds_the_ann_index_above_the_threshold(bucket, ann_run):
    reader = RunReader(bucket, ann_run)
    run = reader.manifest
    assert "index/ann.faiss" in run["outputs"] and "index/ann.faiss" in run["objects"]
    sim = json.loads(reader.bytes("index/similarity.json"))
    assert sim["search"] == "ann" and sim["ann"]["kind"] == "IVFFlat"
    assert sim["ann"]["sha256"] == run["objects"]["index/ann.faiss"]
    assert 1 <= sim["ann"]["nprobe"] <= sim["ann"]["nlist"]
    assert run["analyses"]["embeddings"]["search"] == "ann"
    # Below the threshold the same merge keeps exact search only (and no index object).
    write_run(bucket, "runs/small", 50, DIM, seed=4)
    small = _merge(bucket, "runs/small", ann_threshold=N // 2)
    assert "index/ann.faiss" not in small["outputs"]
    assert json.loads(RunReader(bucket, "runs/small").bytes("index/similarity.json"))["search"] == "exact"
    old = RunReader(bucket, "runs/small").similarity()  # a run without an ANN index: exact, from the matrix
    assert old.ann is None and old.matrix is not None
    hits = old.query(old.matrix[0], k=5, exclude_case=old.items[0]["case_id"])
    assert [h.item_id for h in hits] == [old.items[j]["id"] for j in _exact(
        old.matrix, np.array([it["case_id"] for it in old.items]), old.matrix[0], 5, old.items[0]["case_id"])]


def test_ann_query_returns_the_exact_top_k(bucket, ann_run):
    reader = RunReader(bucket, ann_run)
    index = reader.similarity()  # what the UI loads (ui.data.similarity_index)
    assert index.ann is not None and index.matrix is None and index.can_query and index.dim == DIM
    matrix = load_npy(reader.bytes("index/embeddings.npy"))
    cases = np.array([it["case_id"] for it in index.items])
    exact = SimilarityIndex.from_objects(reader.bytes("index/similarity.json"), reader.bytes("index/embeddings.npy"))
    nlist = json.loads(reader.bytes("index/similarity.json"))["ann"]["nlist"]
    index.ann = AnnSearch(index.ann.index, nlist, index._case_codes)  # every list probed: recall must be 1.0
    found = total = 0
    for row in range(0, N, 37):
        case = index.items[row]["case_id"]
        query = matrix[row] + 0.05 * np.random.default_rng(row).random(DIM).astype(np.float32)
        expected = [index.items[j]["id"] for j in _exact(matrix, cases, query, K, case)]
        hits = index.query(query, k=K, exclude_case=case)
        assert [h.item_id for h in hits] == expected
        assert [h.item_id for h in exact.query(query, k=K, exclude_case=case)] == expected
        assert all(h.case_id != case for h in hits)
        np.testing.assert_allclose([h.score for h in hits],
                                   matrix[[int(h.item_id[3:]) for h in hits]] @ (query / np.linalg.norm(query)),
                                   atol=1e-5)
        # More neighbours than stored: from the vectors the index holds, still exact here.
        many = index.neighbours(item_id(row), k=K * 3)
        assert [h.item_id for h in many] == [index.items[j]["id"]
                                             for j in _exact(matrix, cases, matrix[row], K * 3, case)]
        # Stored neighbours (the merge searched at its calibrated nprobe): nearly all exact ones.
        stored = {h.item_id for h in index.neighbours(item_id(row), k=K)}
        found += len(stored & {index.items[j]["id"] for j in _exact(matrix, cases, matrix[row], K, case)})
        total += K
    assert found / total >= 0.9


def test_a_tampered_ann_index_is_refused(bucket):
    write_run(bucket, "runs/tamper", N, DIM, seed=5)
    _merge(bucket, "runs/tamper", ann_threshold=N // 2)
    reader = RunReader(bucket, "runs/tamper")
    good = bucket.read("runs/tamper/index/ann.faiss")
    sim = reader.bytes("index/similarity.json")
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte inside the stored vectors
    bucket.put("runs/tamper/index/ann.faiss", bytes(bad))  # stores a fresh sha256 with the write: no help
    with pytest.raises(IntegrityError):
        RunReader(bucket, "runs/tamper").similarity()
    with pytest.raises(IntegrityError):  # the query side checks it against similarity.json itself too
        SimilarityIndex.from_objects(sim, ann_index=bytes(bad))
    assert SimilarityIndex.from_objects(sim, ann_index=good).ann is not None


def test_streaming_merge_gives_the_in_memory_outputs(bucket):
    """Byte for byte what the analyses give over every record held in memory (all but the timings)."""
    write_run(bucket, "runs/stream", 300, DIM, seed=6)
    run = _merge(bucket, "runs/stream")
    reader = RunReader(bucket, "runs/stream")
    records = list(read_records(reader, reader.item_ids()))
    assert len(records) == 300 and not any(isinstance(r, IntegrityError) for r in records)
    expected = build_run_outputs(records, read_model(reader))
    assert sorted(expected) == run["outputs"]
    assert any(k.startswith("units/") for k in expected) and "report.json" in expected
    for name, data in expected.items():
        stored = reader.bytes(name)
        if name == "analyses.json":
            a, b = json.loads(stored), json.loads(data)
            a.pop("seconds"), b.pop("seconds")
            assert a == b
        else:
            assert stored == data, name
    # one item's features replaced after commit: left out, the rest merged
    key = "runs/stream/items/" + item_id(7) + "/features.npz"
    bucket.put(key, bucket.read("runs/stream/items/" + item_id(8) + "/features.npz"))
    rerun = _merge(bucket, "runs/stream", force=True)
    assert rerun["counts"]["complete"] == 299 and rerun["counts"]["integrity_failed"] == 1
    assert item_id(7) not in bucket.read("runs/stream/index/ids.json").decode()
