"""Merge a finished run: read the complete items back, build the run-level outputs, write run.json last.

Idempotent: the manifest records a digest of the run's state (complete items, failures, shard
summaries); merging again over an unchanged run writes nothing. Run-level outputs come from
``batch.analyses.build_run_outputs`` (pure functions of the item records), so they are the same
whether the items were produced by one shard or many.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from batch import manifest
from batch.items import COMPLETE, content_type, json_bytes
from batch.records import ItemRecord, ModelInfo
from batch.store import Bucket, RetryPolicy, join, sha256_bytes
from medxplain_client.s3 import S3Config, parse_s3_url
from model_store.bundle import sha256_file

log = logging.getLogger(__name__)


class MergeError(ValueError):
    """The run cannot be merged yet or at all (the CLI prints it and exits 2)."""


def decode_heatmap(meta: dict, data: bytes) -> np.ndarray:
    """A stored heatmap object back to float32 values (the API's encodings)."""
    if meta["encoding"] == "png":
        q = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        lo, hi = meta["scale"]["min"], meta["scale"]["max"]
        return lo + q / 255.0 * (hi - lo if hi > lo else 1.0)
    if meta["encoding"] == "float16":
        return np.frombuffer(data, dtype="<f2").reshape(meta["shape"]).astype(np.float32)
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).get_fdata(), dtype=np.float32)


def decode_mask(name: str, data: bytes) -> np.ndarray:
    if name.endswith(".png"):
        return np.asarray(Image.open(io.BytesIO(data)))
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


class RunReader:
    """Reads a run's objects back as :class:`ItemRecord` / :class:`ModelInfo` (also useful to the UI)."""

    def __init__(self, out: Bucket, prefix: str) -> None:
        self.out, self.prefix = out, prefix

    def key(self, *parts: str) -> str:
        return join(self.prefix, *parts)

    def json(self, *parts: str) -> dict | None:
        data = self.out.get_or_none(self.key(*parts))
        return None if data is None else json.loads(data)

    def model_info(self) -> ModelInfo:
        meta = self.json("model", "model.json")
        if meta is None:
            raise MergeError(f"no batch run at s3://{self.out.name}/{self.prefix} (model/model.json missing)")
        weight = bias = None
        raw = self.out.get_or_none(self.key("model", "classifier.npz"))
        if raw is not None:
            with np.load(io.BytesIO(raw)) as npz:
                weight, bias = npz["weight"], npz["bias"]
        return ModelInfo(kind=meta["kind"], name=meta["name"], version=meta["version"],
                         class_names=list(meta["class_names"]), classifier_weight=weight, classifier_bias=bias,
                         extra=meta)

    def record(self, item_id: str) -> ItemRecord:
        result = json.loads(self.out.get(self.key("items", item_id, "result.json")))
        with np.load(io.BytesIO(self.out.get(self.key("items", item_id, "features.npz")))) as npz:
            features = {name: npz[name] for name in npz.files}
        heatmaps = result.get("heatmaps", {})
        mask_name = result.get("item", {}).get("mask")

        def load_heatmap(method: str) -> np.ndarray:
            meta = heatmaps[method]
            return decode_heatmap(meta, self.out.get(self.key("items", item_id, meta["object"])))

        def load_mask() -> np.ndarray | None:
            if not mask_name:
                return None
            return decode_mask(mask_name, self.out.get(self.key("items", item_id, mask_name)))

        return ItemRecord(item_id, result, features, load_heatmap, load_mask)

    def records(self, item_ids: list[str], threads: int = 8, progress: bool = False) -> list[ItemRecord]:
        with ThreadPoolExecutor(threads) as pool:
            return list(tqdm(pool.map(self.record, item_ids), total=len(item_ids), desc="reading items",
                             unit="item", disable=not progress))


def _ids(out: Bucket, prefix: str, folder: str, suffix: str) -> list[str]:
    return sorted(manifest.listed_ids(out, prefix, folder, suffix))


def merge_run(output: str, s3: S3Config | None = None, s3_env: Path | None = None, archive: Path | None = None,
              progress: bool = False, retry: RetryPolicy | None = None, shards: int | None = None) -> dict:
    """Build run-level outputs and ``run.json`` once every shard has written its summary; returns the manifest."""
    from batch.analyses import SUMMARY_KEY, build_run_outputs

    config = s3 or S3Config.from_env(env_file=s3_env)
    bucket_name, prefix = parse_s3_url(output)
    out = Bucket(config, bucket_name, retry)
    out.ensure(create=False)
    reader = RunReader(out, prefix)
    record = reader.json(manifest.MODEL_RECORD)
    if record is None:
        raise MergeError(f"no batch run at {output} ({manifest.MODEL_RECORD} missing)")
    if archive is not None:
        if not Path(archive).is_file():
            raise MergeError(f"model archive not found: {archive}")
        if sha256_file(Path(archive)) != record["archive_sha256"]:
            raise MergeError(f"{archive} is not the archive this run was made with "
                             f"(run: {record['name']} {record['version']}, sha256 {record['archive_sha256'][:12]}...)")

    shard_keys = [manifest.relative(prefix, k) for k, _ in out.list(join(prefix, manifest.SHARDS_PREFIX))]
    complete_sets = manifest.complete_shard_sets(shard_keys)
    count = shards if shards is not None else (complete_sets[-1] if complete_sets else None)
    if count is None or count not in complete_sets:
        have = sorted(k for k in shard_keys if manifest.parse_shard_key(k))
        raise MergeError(f"not every shard has finished yet (summaries present: {', '.join(have) or 'none'})")
    summaries = [reader.json(manifest.shard_key(i, count)) or {} for i in range(count)]
    digests = {s.get("archive_digest") for s in summaries}
    if digests != {record["archive_digest"]}:
        raise MergeError("the shards were run with different model archives; re-run them with one archive")

    complete = _ids(out, prefix, "items", "/" + COMPLETE)
    failure_ids = _ids(out, prefix, "failures", ".json")
    for stale in set(failure_ids) & set(complete):  # an item that failed once and later succeeded
        out.remove(reader.key("failures", f"{stale}.json"))
    failure_ids = [i for i in failure_ids if i not in set(complete)]
    state = hashlib.sha256(json_bytes({"complete": complete, "failures": failure_ids, "shards": summaries,
                                       "code": manifest.code_version()})).hexdigest()
    existing = reader.json(manifest.RUN_MANIFEST)
    if existing is not None and existing.get("state") == state:
        return existing  # nothing changed since the last merge

    merge_started = manifest.now()
    model = reader.model_info()
    records = reader.records(complete, progress=progress)
    outputs = build_run_outputs(records, model)
    def write(name: str) -> None:
        key = reader.key(name)
        if out.sha256_of(key) != sha256_bytes(outputs[name]):  # unchanged objects keep their timestamps
            out.put(key, outputs[name], content_type(name))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, sorted(outputs)))
    failures = [reader.json("failures", f"{i}.json") or {"id": i} for i in failure_ids]
    analyses = json.loads(outputs[SUMMARY_KEY]) if SUMMARY_KEY in outputs else None
    run = {
        "model": {k: record.get(k) for k in ("name", "version", "kind", "archive_sha256", "archive_digest",
                                            "weights_sha256")},
        "code_version": manifest.code_version(),
        "arguments": summaries[0].get("arguments"),
        "started": min((s.get("started") for s in summaries if s.get("started")), default=merge_started),
        "ended": manifest.now(),
        "merge_started": merge_started,
        "counts": {"items": summaries[0].get("source_items", len(complete) + len(failure_ids)),
                   "complete": len(complete), "failed": len(failure_ids),
                   "processed": sum(s.get("processed", 0) for s in summaries),
                   "skipped": sum(s.get("skipped", 0) for s in summaries)},
        "truth": summaries[0].get("truth"),
        "failures": [{k: f.get(k) for k in ("id", "error", "message", "attempts")} for f in failures],
        "shards": [{k: v for k, v in s.items() if k != "arguments"} | {"arguments": s.get("arguments")}
                   for s in summaries],
        "outputs": sorted(outputs),
        "analyses": analyses,
        "state": state,
    }
    out.put(reader.key(manifest.RUN_MANIFEST), json_bytes(run), "application/json")
    return run
