"""Merge a finished run: read the complete items back, build the run-level outputs, write run.json last.

Idempotent: the manifest records a digest of the run's state (complete items, failures, shard
summaries); merging again over an unchanged run writes nothing. One merger at a time holds the
run's merge lock (``batch.claims``, ``If-None-Match: *``), so two shards finishing together do not
both write: the second waits and then finds nothing changed. Every item object is verified against
the item's ``_complete.json`` before use; an item with a mismatch is left out and listed in
``run.json`` (``integrity``). Run-level outputs come from ``batch.analyses.RunAnalyses`` (pure
functions of the item records), so they are the same whether the items were produced by one shard
or many.

Streaming, with bounded memory: items are read a window at a time (``threads`` reads in flight,
in item order), each verified record is fed to the analyses and then dropped; large outputs
(embeddings, similarity.json, the ANN index) are files in a temporary folder, uploaded from disk.
What grows with the number of items is small per item: its id (listing, state digest), its case
code and its AUC scores (``batch.analyses.quality.ClassificationTally``), plus the FAISS index of
runs above ``ann_threshold`` (IVF-Flat holds the vectors: items x dim x 4 bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from batch import manifest
from batch.claims import Writer
from batch.items import content_type, json_bytes
from batch.records import ItemRecord, ModelInfo
from medxplain_contract.checksums import IntegrityError
from medxplain_contract.integrity import sha256_file as sha256_of_file
from medxplain_contract.layout import ATTEMPTS, FINGERPRINT, MODEL_RECORD, RUN_MANIFEST, RunLayout, parse_shard_key
from medxplain_contract.runs import RunReader
from medxplain_contract.storage import Bucket, RetryPolicy, S3Config, parse_s3_url, sha256_bytes
from medxplain_models.bundle import sha256_file

log = logging.getLogger(__name__)


class MergeError(ValueError):
    """The run cannot be merged yet or at all (the CLI prints it and exits 2)."""


def read_model(reader: RunReader) -> ModelInfo:
    """The run's model (model/model.json, classifier.npz for ddsm), each checked by the contract reader."""
    meta = reader.model_json()
    if not meta:
        raise MergeError(f"no batch run at s3://{reader.bucket.name}/{reader.prefix} (model/model.json missing)")
    weight, bias = reader.classifier() or (None, None)
    return ModelInfo(kind=meta["kind"], name=meta["name"], version=meta["version"],
                     class_names=list(meta["class_names"]), classifier_weight=weight, classifier_bias=bias,
                     extra=meta)


def read_record(reader: RunReader, item_id: str) -> ItemRecord:
    """The item's objects, each checked against its ``_complete.json`` (IntegrityError on a mismatch).

    ``result.json`` and ``features.npz`` are read and hashed; the other objects are checked by the
    sha256 stored with their write (one HEAD each) and hashed again when an analysis reads them.
    """
    result = reader.result(item_id)
    features = reader.features(item_id)
    reader.check_committed(item_id, skip=("result.json", "features.npz"))
    return ItemRecord(item_id, result, features, lambda method: reader.heatmap(item_id, method, result),
                      lambda: reader.mask(item_id, result))


def read_records(reader: RunReader, item_ids: list[str], threads: int = 8,
                 progress: bool = False) -> Iterator[ItemRecord | IntegrityError]:
    """Each item's verified record (or the integrity problem that leaves it out), in item order.

    At most ``2 x threads`` items are read ahead of the consumer, so memory does not grow with the run.
    """
    def attempt(item_id: str) -> ItemRecord | IntegrityError:
        try:
            return read_record(reader, item_id)
        except IntegrityError as err:
            return err

    window = 2 * threads
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(item_ids), desc="reading items", unit="item",
                                                   disable=not progress) as bar:
        pending = deque(pool.submit(attempt, i) for i in item_ids[:window])
        for position in range(len(item_ids)):
            read = pending.popleft()
            if position + window < len(item_ids):
                pending.append(pool.submit(attempt, item_ids[position + window]))
            bar.update()
            yield read.result()


@dataclass
class MergeOutcome:
    run: dict  # the manifest now in run.json
    wrote: bool  # False: nothing had changed since the last merge (nothing written)


def merge_run(output: str, s3: S3Config | None = None, s3_env: Path | None = None, archive: Path | None = None,
              progress: bool = False, retry: RetryPolicy | None = None, shards: int | None = None,
              force: bool = False, ann_threshold: int | None = None) -> dict:
    """Build run-level outputs and ``run.json`` once every shard has written its summary; returns the manifest.

    ``force`` rebuilds (and re-verifies every item) even when nothing changed since the last merge.
    ``ann_threshold``: runs with more items get the FAISS index (None: ``batch.analyses.ann.DEFAULT_THRESHOLD``).
    """
    return merge(output, s3, s3_env, archive, progress, retry, shards, force=force, ann_threshold=ann_threshold).run


def _analyse(reader: RunReader, item_ids: list[str], model: ModelInfo, workdir: Path, progress: bool,
             ann_threshold: int | None) -> tuple[dict[str, bytes | Path], int, list[IntegrityError]]:
    """Stream every item through the run-level analyses; (outputs, items used, items left out)."""
    from batch.analyses import RunAnalyses
    from batch.analyses.ann import DEFAULT_THRESHOLD

    analyses = RunAnalyses(model, workdir, ann_threshold=DEFAULT_THRESHOLD if ann_threshold is None else ann_threshold)
    problems: list[IntegrityError] = []
    for read in read_records(reader, item_ids, progress=progress):
        if isinstance(read, IntegrityError):
            problems.append(read)
            continue
        try:
            analyses.add(read)  # all or nothing: a heatmap or mask failing its check leaves the item out
        except IntegrityError as err:
            problems.append(err)
        reader.forget(read.item_id)
    return analyses.finish(), analyses.items, problems


def merge(output: str, s3: S3Config | None = None, s3_env: Path | None = None, archive: Path | None = None,
          progress: bool = False, retry: RetryPolicy | None = None, shards: int | None = None,
          writer: Writer | None = None, force: bool = False, ann_threshold: int | None = None) -> MergeOutcome:
    """:func:`merge_run`, also saying whether this call wrote; ``writer`` holds the merge lock (its heartbeat)."""
    config = s3 or S3Config.from_env(env_file=s3_env)
    bucket_name, prefix = parse_s3_url(output)
    out = Bucket(config, bucket_name, retry)
    out.ensure(create=False)
    reader = RunReader(out, prefix)
    record = reader.bookkeeping(MODEL_RECORD)
    if record is None:
        raise MergeError(f"no batch run at {output} ({MODEL_RECORD} missing)")
    if archive is not None:
        if not Path(archive).is_file():
            raise MergeError(f"model archive not found: {archive}")
        if sha256_file(Path(archive)) != record["archive_sha256"]:
            raise MergeError(f"{archive} is not the archive this run was made with "
                             f"(run: {record['name']} {record['version']}, sha256 {record['archive_sha256'][:12]}...)")

    shard_keys = manifest.shard_keys(out, prefix)
    complete_sets = manifest.complete_shard_sets(shard_keys)
    count = shards if shards is not None else (complete_sets[-1] if complete_sets else None)
    if count is None or count not in complete_sets:
        have = sorted(k for k in shard_keys if parse_shard_key(k))
        raise MergeError(f"not every shard has finished yet (summaries present: {', '.join(have) or 'none'})")

    def state() -> tuple[list[dict], list[str], list[str], str]:
        summaries = [reader.bookkeeping(manifest.shard_key(i, count)) or {} for i in range(count)]
        complete = reader.item_ids()
        failure_ids = [i for i in reader.failure_ids() if i not in set(complete)]
        digest = hashlib.sha256(json_bytes({"complete": complete, "failures": failure_ids, "shards": summaries,
                                            "code": manifest.code_version()})).hexdigest()
        return summaries, complete, failure_ids, digest

    existing = reader.bookkeeping(RUN_MANIFEST)
    if not force and existing is not None and existing.get("state") == state()[3]:
        return MergeOutcome(existing, False)  # nothing changed since the last merge: not even a lock
    writer = writer or Writer(out, prefix)
    started_here = not writer.running
    writer.start()
    try:
        with writer.merge_lock():
            return _merge_locked(out, prefix, reader, record, state, progress, force, ann_threshold)
    finally:
        if started_here:
            writer.stop()


def _merge_locked(out: Bucket, prefix: str, reader: RunReader, record: dict, state, progress: bool,
                  force: bool, ann_threshold: int | None = None) -> MergeOutcome:
    from batch.analyses import SUMMARY_KEY

    summaries, complete, failure_ids, digest = state()  # again: another merger may have just finished
    existing = reader.bookkeeping(RUN_MANIFEST)
    if not force and existing is not None and existing.get("state") == digest:
        return MergeOutcome(existing, False)
    fingerprint = reader.bookkeeping(FINGERPRINT)
    digests = {s.get("archive_digest") for s in summaries}
    if digests != {record["archive_digest"]}:
        raise MergeError("the shards were run with different model archives; re-run them with one archive")
    if fingerprint is not None and {s.get("fingerprint") for s in summaries} != {fingerprint["fingerprint"]}:
        raise MergeError("the shards were run with different options; re-run them with the run's options")
    layout = RunLayout(prefix)
    for stale in set(reader.failure_ids()) & set(complete):  # failed once, later succeeded
        out.remove(layout.failure(stale))
    for stale in set(reader.listed_ids(ATTEMPTS, ".json")) & set(complete):  # marker of a finished item
        out.remove(layout.attempt(stale))

    merge_started = manifest.now()
    model = read_model(reader)
    with tempfile.TemporaryDirectory(prefix="medxai-merge-") as workdir:
        outputs, used, problems = _analyse(reader, complete, model, Path(workdir), progress, ann_threshold)
        for problem in problems:
            log.warning("left out of the merge: %s", problem)
        objects = {name: sha256_bytes(data) if isinstance(data, bytes) else sha256_of_file(data)
                   for name, data in outputs.items()}

        def write(name: str) -> None:
            key, data = layout.key(name), outputs[name]
            if out.sha256_of(key) == objects[name]:  # unchanged objects keep their timestamps
                return
            if isinstance(data, bytes):
                out.put(key, data, content_type(name))
            else:
                out.put_file(key, data, content_type(name))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, sorted(outputs)))
        analyses = json.loads(outputs[SUMMARY_KEY]) if SUMMARY_KEY in outputs else None
    failures = [reader.bookkeeping(RunLayout("").failure(i)) or {"id": i} for i in failure_ids]
    for name in (RunLayout("").model(n) for n in ("model.json", "model_card.json", "unit_labels.json", "classifier.npz")):
        stored = out.sha256_of(layout.key(name))
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
                   "complete": used, "failed": len(failure_ids), "integrity_failed": len(problems),
                   "processed": sum(s.get("processed", 0) for s in summaries),
                   "skipped": sum(s.get("skipped", 0) for s in summaries)},
        "truth": summaries[0].get("truth"),
        "failures": [{k: f.get(k) for k in ("id", "error", "message", "attempts")} for f in failures],
        "integrity": [{"id": p.item_id, "key": layout.relative(p.key), "error": p.reason}
                      for p in sorted(problems, key=lambda p: p.key)],
        "shards": [{k: v for k, v in s.items() if k != "arguments"} | {"arguments": s.get("arguments")}
                   for s in summaries],
        "outputs": sorted(outputs),
        "objects": objects,  # sha256 of each run-level and model object, for readers to check
        "analyses": analyses,
        "state": digest,
    }
    out.put(layout.run_json, json_bytes(run), "application/json")
    return MergeOutcome(run, True)
