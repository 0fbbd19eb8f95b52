"""Merge a finished run: read the complete items back, build the run-level outputs, write run.json last.

Idempotent: the manifest records a digest of the run's state (complete items, failures, shard
summaries); merging again over an unchanged run writes nothing. One merger at a time holds the
run's merge lock (``batch.claims``, ``If-None-Match: *``), so two shards finishing together do not
both write: the second waits and then finds nothing changed. Every item object is verified against
the item's ``_complete.json`` before use; an item with a mismatch is left out and listed in
``run.json`` (``integrity``). Run-level outputs come from ``batch.analyses.build_run_outputs``
(pure functions of the item records), so they are the same whether the items were produced by one
shard or many.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from batch import manifest
from batch.claims import Writer
from batch.fingerprint import FINGERPRINT
from batch.integrity import IntegrityError, verified
from batch.items import COMPLETE, content_type, json_bytes
from batch.records import ItemRecord, ModelInfo
from batch.store import Bucket, RetryPolicy, join, sha256_bytes
from medxplain_contract.storage import S3Config, parse_s3_url
from medxplain_models.bundle import sha256_file

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
        if self.out.stat(self.key("model", "model.json")) is None:
            raise MergeError(f"no batch run at s3://{self.out.name}/{self.prefix} (model/model.json missing)")
        meta = json.loads(self.out.get_checked(self.key("model", "model.json")))
        weight = bias = None
        if self.out.stat(self.key("model", "classifier.npz")) is not None:
            raw = self.out.get_checked(self.key("model", "classifier.npz"))
            with np.load(io.BytesIO(raw)) as npz:
                weight, bias = npz["weight"], npz["bias"]
        return ModelInfo(kind=meta["kind"], name=meta["name"], version=meta["version"],
                         class_names=list(meta["class_names"]), classifier_weight=weight, classifier_bias=bias,
                         extra=meta)

    def record(self, item_id: str) -> ItemRecord:
        """The item's objects, each checked against its ``_complete.json`` (IntegrityError on a mismatch).

        ``result.json`` and ``features.npz`` are read and hashed; the other objects are checked by the
        sha256 stored with their write (one HEAD each) and hashed again when an analysis reads them.
        """
        marker = json.loads(self.out.get(self.key("items", item_id, COMPLETE)))

        def read(name: str) -> bytes:
            key = self.key("items", item_id, name)
            return verified(key, self.out.get(key), marker.get(name), item_id)

        result = json.loads(read("result.json"))
        with np.load(io.BytesIO(read("features.npz"))) as npz:
            features = {name: npz[name] for name in npz.files}
        for name, expected in sorted(marker.items()):  # the rest: the sha256 stored with the write (a HEAD)
            if name not in ("result.json", "features.npz"):
                key = self.key("items", item_id, name)
                stat = self.out.stat(key)
                if stat is None or stat[1] != expected:
                    raise IntegrityError(key, "missing" if stat is None else "sha256_mismatch", item_id)
        heatmaps = result.get("heatmaps", {})
        mask_name = result.get("item", {}).get("mask")

        def load_heatmap(method: str) -> np.ndarray:
            meta = heatmaps[method]
            return decode_heatmap(meta, read(meta["object"]))

        def load_mask() -> np.ndarray | None:
            if not mask_name:
                return None
            return decode_mask(mask_name, read(mask_name))

        return ItemRecord(item_id, result, features, load_heatmap, load_mask)

    def records(self, item_ids: list[str], threads: int = 8,
                progress: bool = False) -> tuple[list[ItemRecord], list[IntegrityError]]:
        """The verified records, and the integrity problems of the items left out."""
        def attempt(item_id: str) -> ItemRecord | IntegrityError:
            try:
                return self.record(item_id)
            except IntegrityError as err:
                return err

        with ThreadPoolExecutor(threads) as pool:
            read = list(tqdm(pool.map(attempt, item_ids), total=len(item_ids), desc="reading items",
                             unit="item", disable=not progress))
        return ([r for r in read if isinstance(r, ItemRecord)], [r for r in read if isinstance(r, IntegrityError)])


def _ids(out: Bucket, prefix: str, folder: str, suffix: str) -> list[str]:
    return sorted(manifest.listed_ids(out, prefix, folder, suffix))


@dataclass
class MergeOutcome:
    run: dict  # the manifest now in run.json
    wrote: bool  # False: nothing had changed since the last merge (nothing written)


def merge_run(output: str, s3: S3Config | None = None, s3_env: Path | None = None, archive: Path | None = None,
              progress: bool = False, retry: RetryPolicy | None = None, shards: int | None = None,
              force: bool = False) -> dict:
    """Build run-level outputs and ``run.json`` once every shard has written its summary; returns the manifest.

    ``force`` rebuilds (and re-verifies every item) even when nothing changed since the last merge.
    """
    return merge(output, s3, s3_env, archive, progress, retry, shards, force=force).run


def _build(records: list[ItemRecord], model: ModelInfo,
           problems: list[IntegrityError]) -> tuple[dict[str, bytes], list[ItemRecord]]:
    """Run-level outputs; an item whose heatmap or mask fails its check is dropped and the outputs rebuilt."""
    from batch.analyses import build_run_outputs

    while True:
        try:
            return build_run_outputs(records, model), records
        except IntegrityError as err:
            problems.append(err)
            records = [r for r in records if r.item_id != err.item_id]


def merge(output: str, s3: S3Config | None = None, s3_env: Path | None = None, archive: Path | None = None,
          progress: bool = False, retry: RetryPolicy | None = None, shards: int | None = None,
          writer: Writer | None = None, force: bool = False) -> MergeOutcome:
    """:func:`merge_run`, also saying whether this call wrote; ``writer`` holds the merge lock (its heartbeat)."""
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

    def state() -> tuple[list[dict], list[str], list[str], str]:
        summaries = [reader.json(manifest.shard_key(i, count)) or {} for i in range(count)]
        complete = _ids(out, prefix, "items", "/" + COMPLETE)
        failure_ids = [i for i in _ids(out, prefix, "failures", ".json") if i not in set(complete)]
        digest = hashlib.sha256(json_bytes({"complete": complete, "failures": failure_ids, "shards": summaries,
                                            "code": manifest.code_version()})).hexdigest()
        return summaries, complete, failure_ids, digest

    existing = reader.json(manifest.RUN_MANIFEST)
    if not force and existing is not None and existing.get("state") == state()[3]:
        return MergeOutcome(existing, False)  # nothing changed since the last merge: not even a lock
    writer = writer or Writer(out, prefix)
    started_here = not writer.running
    writer.start()
    try:
        with writer.merge_lock():
            return _merge_locked(out, prefix, reader, record, state, progress, force)
    finally:
        if started_here:
            writer.stop()


def _merge_locked(out: Bucket, prefix: str, reader: RunReader, record: dict, state, progress: bool,
                  force: bool) -> MergeOutcome:
    from batch.analyses import SUMMARY_KEY

    summaries, complete, failure_ids, digest = state()  # again: another merger may have just finished
    existing = reader.json(manifest.RUN_MANIFEST)
    if not force and existing is not None and existing.get("state") == digest:
        return MergeOutcome(existing, False)
    fingerprint = reader.json(FINGERPRINT)
    digests = {s.get("archive_digest") for s in summaries}
    if digests != {record["archive_digest"]}:
        raise MergeError("the shards were run with different model archives; re-run them with one archive")
    if fingerprint is not None and {s.get("fingerprint") for s in summaries} != {fingerprint["fingerprint"]}:
        raise MergeError("the shards were run with different options; re-run them with the run's options")
    for stale in set(_ids(out, prefix, "failures", ".json")) & set(complete):  # failed once, later succeeded
        out.remove(reader.key("failures", f"{stale}.json"))
    for stale in set(_ids(out, prefix, "attempts", ".json")) & set(complete):  # marker of a finished item
        out.remove(reader.key("attempts", f"{stale}.json"))

    merge_started = manifest.now()
    model = reader.model_info()
    records, problems = reader.records(complete, progress=progress)
    outputs, records = _build(records, model, problems)
    for problem in problems:
        log.warning("left out of the merge: %s", problem)

    def write(name: str) -> None:
        key = reader.key(name)
        if out.sha256_of(key) != sha256_bytes(outputs[name]):  # unchanged objects keep their timestamps
            out.put(key, outputs[name], content_type(name))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, sorted(outputs)))
    failures = [reader.json("failures", f"{i}.json") or {"id": i} for i in failure_ids]
    analyses = json.loads(outputs[SUMMARY_KEY]) if SUMMARY_KEY in outputs else None
    objects = {name: sha256_bytes(data) for name, data in outputs.items()}
    for name in ("model/model.json", "model/model_card.json", "model/unit_labels.json", "model/classifier.npz"):
        stored = out.sha256_of(reader.key(name))
        if stored is not None:
            objects[name] = stored
    run = {
        "model": {k: record.get(k) for k in ("name", "version", "kind", "archive_sha256", "archive_digest",
                                            "weights_sha256", "engine")},
        "fingerprint": fingerprint,
        "code_version": manifest.code_version(),
        "arguments": summaries[0].get("arguments"),
        "started": min((s.get("started") for s in summaries if s.get("started")), default=merge_started),
        "ended": manifest.now(),
        "merge_started": merge_started,
        "counts": {"items": summaries[0].get("source_items", len(complete) + len(failure_ids)),
                   "complete": len(records), "failed": len(failure_ids), "integrity_failed": len(problems),
                   "processed": sum(s.get("processed", 0) for s in summaries),
                   "skipped": sum(s.get("skipped", 0) for s in summaries)},
        "truth": summaries[0].get("truth"),
        "failures": [{k: f.get(k) for k in ("id", "error", "message", "attempts")} for f in failures],
        "integrity": [{"id": p.item_id, "key": manifest.relative(prefix, p.key), "error": p.reason}
                      for p in sorted(problems, key=lambda p: p.key)],
        "shards": [{k: v for k, v in s.items() if k != "arguments"} | {"arguments": s.get("arguments")}
                   for s in summaries],
        "outputs": sorted(outputs),
        "objects": objects,  # sha256 of each run-level and model object, for readers to check
        "analyses": analyses,
        "state": digest,
    }
    out.put(reader.key(manifest.RUN_MANIFEST), json_bytes(run), "application/json")
    return MergeOutcome(run, True)
