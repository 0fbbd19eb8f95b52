"""One shard of a batch run: plan, skip what is complete, infer in batches, write objects, summarise.

The pipeline keeps the forward pass busy: a fetch pool reads the next batches and runs the engine's
``prepare`` stage on them (decode, validate, budget) while the main thread runs the remaining stages
(``Engine.run_prepared``: infer, explain, serialise, features) on the current batch, and an upload
pool writes finished items. These are the stages TorchServe's adapter runs, so online and batch
results for the same input are the same bytes. An item's ``_complete.json`` is written after all its other objects (create-once, with
``If-None-Match: *``), so a crash at any point leaves either a complete item or one that the next
run redoes. Before an item is read and decoded its attempt marker is written (``batch.claims``):
a live writer's marker keeps a second pod off the item, and an item whose attempts keep killing the
process is isolated on the next run (processed alone, after the others) and, after
``max_attempts``, recorded in ``failures/`` without being processed again.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batch import faults, manifest
from batch.archive import LoadedArchive, load_archive
from batch.claims import Writer
from batch.fingerprint import check_or_record
from batch.items import content_type, failure_record, item_objects, json_bytes, npz_bytes
from batch.pseudonyms import open_pseudonyms, record_sources
from batch.sink import MARKER, DicomSink
from batch.sources import MAX_INPUT_BYTES, DicomwebSource, Source, SourceItem, open_source, plan_items, shard_of
from medxplain_contract import dicomweb
from medxplain_contract.errors import InputError
from medxplain_contract.layout import COMPLETE, RunLayout
from medxplain_contract.storage import (
    Bucket,
    PreconditionFailed,
    RetryPolicy,
    S3Config,
    StorageConfigError,
    StorageUnavailable,
    describe,
    parse_s3_url,
    sha256_bytes,
)
from medxplain_engine.device import describe_device
from medxplain_engine.engine import API_VERSION, EngineRequest, Prepared

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad arguments or settings: the CLI prints the message and exits 2."""


@dataclass
class RunOptions:
    model: str  # "ddsm" | "adni"
    archive: Path
    input: str  # local folder, s3://bucket/prefix or a DICOMweb root http(s)://host/dicom-web
    output: str  # s3://bucket/prefix
    explain: tuple[str, ...] = ()
    shard: int = 0
    shards: int = 1
    labels: Path | None = None
    split: str | None = None  # only index rows of this split (e.g. "test")
    batch_size: int = 4
    top_k: int = 8
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    io_threads: int = 4
    s3_env: Path | None = None
    s3: S3Config | None = None  # overrides s3_env / environment (API callers)
    progress: bool = True
    merge: bool = True  # the last shard to finish merges the run
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    id_key: bytes | None = field(default=None, repr=False)  # None: the run's own random key
    max_attempts: int = 3  # attempts that killed the process before an item goes to failures/
    eager: bool = False  # True: leave out the CPU speed-ups the archive's model-config turns on (as served)
    device: str = "cpu"  # "auto" | "cpu" | "cuda" | "cuda:N" (medxplain_engine/device.py)
    amp: bool = False  # autocast for forward-only items (no --explain); result-changing, so fingerprinted
    study: str | None = field(default=None, repr=False)  # DICOMweb source filters (UIDs: never recorded)
    series: str | None = field(default=None, repr=False)
    modality: str | None = None  # DICOMweb source: default the model's (MG / MR); "any": no filter
    stow: str | None = None  # DICOMweb root to STOW-RS each item's derived objects to (batch/sink.py)
    dicomweb_env: Path | None = None  # env file with MEDXAI_DICOMWEB_* credentials
    dicomweb: dicomweb.DicomwebConfig | None = field(default=None, repr=False)  # overrides dicomweb_env (API)

    def arguments(self) -> dict:
        return {"model": self.model, "archive": str(self.archive), "input": self.input, "output": self.output,
                "explain": list(self.explain), "shard": f"{self.shard}/{self.shards}",
                "labels": str(self.labels) if self.labels else None, "split": self.split, "batch_size": self.batch_size,
                "top_k": self.top_k, "threads": self.threads, "device": self.device, "amp": self.amp,
                **({"dicomweb_filters": {"study": bool(self.study), "series": bool(self.series),
                                         "modality": self.modality}} if self.study or self.series or self.modality else {}),
                **({"stow": dicomweb.display_url(self.stow)} if self.stow else {})}


@dataclass
class ShardResult:
    output: str
    shard: int
    shards: int
    items: int = 0  # assigned to this shard
    processed: int = 0  # completed by this invocation
    skipped: int = 0  # already complete
    failed: dict[str, str] = field(default_factory=dict)  # item id -> error code
    held: int = 0  # left to another live writer that had claimed them
    seconds: float = 0.0  # whole invocation, model loading included
    loop_seconds: float = 0.0  # the item pipeline only (throughput)
    merged: bool = False  # run.json is up to date with this shard (merged now or earlier)
    merge_wrote: bool = False  # this invocation's merge wrote run.json (False: nothing had changed)
    run_failures: int = 0  # failures of the whole run, known after a merge

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def items_per_second(self) -> float:
        return self.processed / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (f"shard {self.shard}/{self.shards}: {self.items} items, {self.processed} processed, "
                f"{self.skipped} skipped (already complete), {len(self.failed)} failed, "
                + (f"{self.held} held by another writer, " if self.held else "")
                + f"{self.seconds:.1f} s, {self.items_per_second:.2f} items/s -> {self.output}")


def storage_config(options: RunOptions) -> S3Config:
    return options.s3 or S3Config.from_env(env_file=options.s3_env)


@dataclass
class Fetched:
    item: SourceItem
    prepared: Prepared | InputError | None = None  # the engine's prepare stage, run in the fetch pool
    mask: bytes | None = None
    error: tuple[str, str] | None = None  # (code, message) when the input could not even be read
    held: bool = False  # another live writer claimed it: leave it alone
    claimed: bool = False  # our attempt marker exists (released once the item is finished)


def _reason(err: BaseException) -> str:
    """An error without file names: OSError texts carry the path, which may name a patient."""
    return describe(err) if getattr(err, "code", None) else type(err).__name__


Submit = Callable[..., object]


class ShardRun:
    """State of one invocation; :func:`run_batch` is the entry point."""

    def __init__(self, options: RunOptions, out: Bucket, prefix: str, loaded: LoadedArchive,
                 source: Source | DicomwebSource, writer: Writer, sink: DicomSink | None = None) -> None:
        self.options, self.out, self.prefix, self.loaded, self.source = options, out, prefix, loaded, source
        self.writer = writer
        self.sink = sink  # --stow: derived DICOM objects go to the PACS before an item is complete
        self.stow_only: set[str] = set()  # complete items of an earlier run without --stow: send their objects only
        self.engine = loaded.engine
        self.params = {"top_k": options.top_k, "explain": ",".join(options.explain)}
        self.request_options = self.engine.options(self.params)
        self.lock = threading.Lock()
        self.result = ShardResult(options.output, options.shard, options.shards)
        self.previous_failures: set[str] = set()
        self.bar: tqdm | None = None

    def key(self, *parts: str) -> str:
        return RunLayout(self.prefix).key(*parts)

    # -- per item ---------------------------------------------------------------------------------

    def fetch(self, item: SourceItem) -> Fetched:
        if item.size is None and self.source.sized:
            return Fetched(item, error=("missing_input", "listed in the index but not found in the source"))
        if item.size is not None and item.size > MAX_INPUT_BYTES:
            return Fetched(item, error=("input_too_large", f"file of {item.size} bytes exceeds {MAX_INPUT_BYTES}"))
        try:
            claim = self.writer.claim(item.item_id, self.options.max_attempts)
        except StorageConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - storage outage: this item only, a re-run redoes it
            return Fetched(item, error=("storage_unavailable", f"could not record the attempt: {_reason(err)}"))
        if claim.status == "held":
            return Fetched(item, held=True)
        if (claim.status == "claimed" and item.item_id not in self.stow_only
                and self.out.stat(RunLayout(self.prefix).complete(item.item_id)) is not None):
            # Planned as incomplete, but another writer completed it and released its claim since:
            # leave its committed objects alone (they must never be overwritten).
            self.writer.release(item.item_id)
            return Fetched(item, held=True)
        if claim.status == "poison":
            message = (f"the process died in each of {claim.attempts} attempts at this item; left out "
                       "(remove its attempts/ marker to retry)")
            return Fetched(item, error=("poison_item", message))
        try:
            payload = self.source.read(item.key)
            mask = self.source.read_optional(item.mask_key) if item.mask_key else None
        except StorageConfigError:
            raise
        except dicomweb.PacsTooLarge as err:
            return Fetched(item, error=("input_too_large", str(err)), claimed=True)
        except dicomweb.PacsError as err:  # one line without UIDs or credentials
            return Fetched(item, error=("input_unreadable", f"could not read the input: {err}"), claimed=True)
        except Exception as err:  # noqa: BLE001 - missing object, I/O error, long outage: this item only
            return Fetched(item, error=("input_unreadable", f"could not read the input: {_reason(err)}"), claimed=True)
        faults.before_decode(item.key)
        return Fetched(item, self.engine.prepare_isolated(EngineRequest(payload, self.params)), mask, claimed=True)

    def store_item(self, fetched: Fetched, response: dict, features, datasets: list | None = None) -> None:
        item = fetched.item
        if self.sink is not None and not datasets:  # checked before anything is written
            self.fail(item, "dicom_output_unavailable", "--stow needs a DICOM input: this item has no DICOM "
                      "headers to attach derived objects to", 422)
            return
        try:
            if item.item_id in self.stow_only:  # its MinIO objects are committed already: the PACS only
                self.stow(item, datasets)
                self.writer.release(item.item_id)
                self.done(processed=True)
                return
            objects = item_objects(self.engine.kind, item, response, features, fetched.mask)
            digests = {name: self.out.put(RunLayout(self.prefix).item(item.item_id, name), data, content_type(name))
                       for name, data in objects.items()}
            if self.sink is not None:  # all objects in MinIO: now the PACS, then the marker, then complete
                digests[MARKER] = self.stow(item, datasets)
            try:
                self.out.put_if(RunLayout(self.prefix).complete(item.item_id), json_bytes(digests), "application/json")
            except PreconditionFailed:  # another writer committed it first; readers check its marker
                log.warning("item %s was completed by another writer meanwhile; this copy is dropped", item.item_id)
                self.writer.release(item.item_id)
                self.done(processed=False)
                return
            if item.item_id in self.previous_failures:
                self.out.remove(RunLayout(self.prefix).failure(item.item_id))
            self.writer.release(item.item_id)
        except (StorageUnavailable, StorageConfigError) as err:
            self.fail(item, "storage_unavailable", str(err))
            return
        except dicomweb.PacsError as err:  # nothing marked: a re-run sends the same objects (same UIDs) again
            self.fail(item, "pacs_store_failed", str(err))
            return
        except Exception as err:
            log.exception("writing item %s failed", item.item_id)
            self.fail(item, "internal_error", f"writing the outputs failed: {type(err).__name__}")
            return
        self.done(processed=True)

    def stow(self, item: SourceItem, datasets: list) -> str:
        """STOW-RS the item's derived objects, then write its marker; returns the marker's sha256."""
        record = self.sink.store(datasets)
        return self.out.put(self.sink.marker_key(item.item_id), json_bytes(record), "application/json")

    def fail(self, item: SourceItem, code: str, message: str, status: int | None = None, *,
             release: bool = True) -> None:
        """Record why ``item`` failed; ``release`` drops our attempt marker (kept for poison items)."""
        with self.lock:
            self.result.failed[item.item_id] = code
        key = self.key("failures", f"{item.item_id}.json")
        try:
            attempts = 1
            if item.item_id in self.previous_failures:
                old = self.out.get_or_none(key)
                attempts = int(json.loads(old).get("attempts", 0)) + 1 if old else 1
            self.out.put(key, failure_record(item, code, message, attempts, status), "application/json")
            if release:
                self.writer.release(item.item_id)
        except Exception as err:  # noqa: BLE001 - storage down: the shard summary still counts it
            log.warning("could not record the failure of %s: %s", item.item_id, describe(err))
        self.done(processed=False)

    def done(self, processed: bool, held: bool = False) -> None:
        with self.lock:
            if processed:
                self.result.processed += 1
            if held:
                self.result.held += 1
            if self.bar is not None:
                self.bar.update(1)

    def dispatch(self, fetched: list[Fetched], submit: Submit) -> list:
        """Infer the fetched items that can be, hand every outcome to ``submit`` (pool or inline)."""
        tasks, ok = [], []
        for f in fetched:
            if f.held:
                self.done(processed=False, held=True)
            elif f.error is not None:
                tasks.append(submit(self.fail, f.item, *f.error, release=f.claimed))
            elif isinstance(f.prepared, InputError):  # refused by prepare: the engine would pass it through
                tasks.append(submit(self.fail, f.item, f.prepared.code, f.prepared.message, f.prepared.status))
            elif self.sink is not None and isinstance(f.prepared, Prepared) and f.prepared.source is None:
                tasks.append(submit(self.fail, f.item, "dicom_output_unavailable", "--stow needs a DICOM input: "
                                    "this item has no DICOM headers to attach derived objects to", 422))
            else:
                ok.append(f)
        if not ok:
            return tasks
        try:
            dicom = {"with_dicom": True} if self.sink is not None else {}  # the engine's DICOM stage (issue 14)
            results = self.engine.run_prepared([f.prepared for f in ok], with_features=True, **dicom)
        except Exception as err:  # e.g. out of memory: fail this batch, keep the run going
            log.exception("a batch failed in the engine")
            results = [InputError("internal_error", f"inference failed: {type(err).__name__}")] * len(ok)
        for f, r in zip(ok, results):
            f.prepared = None  # drop the input early
            if isinstance(r, InputError):
                tasks.append(submit(self.fail, f.item, r.code, r.message, r.status))
            else:
                tasks.append(submit(self.store_item, f, r.response, r.features, getattr(r, "dicom", None)))
        return tasks

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, todo: list[SourceItem]) -> None:
        opts = self.options
        batches = [todo[i:i + opts.batch_size] for i in range(0, len(todo), opts.batch_size)]
        self.bar = tqdm(total=len(todo), unit="item", desc=f"{self.engine.kind} shard {opts.shard}/{opts.shards}",
                        disable=not opts.progress, file=sys.stderr)
        try:
            with ThreadPoolExecutor(max(2, opts.io_threads // 2), thread_name_prefix="fetch") as fetch_pool, \
                    ThreadPoolExecutor(opts.io_threads, thread_name_prefix="upload") as upload_pool:
                queued: deque[list[Future]] = deque()
                upcoming = iter(batches)
                lookahead = 2

                def submit_next() -> None:
                    batch = next(upcoming, None)
                    if batch is not None:
                        queued.append([fetch_pool.submit(self.fetch, item) for item in batch])

                for _ in range(lookahead):
                    submit_next()
                pending: deque[Future] = deque()
                while queued:
                    fetched = [f.result() for f in queued.popleft()]
                    submit_next()
                    pending.extend(self.dispatch(fetched, upload_pool.submit))
                    while len(pending) > 2 * opts.batch_size + opts.io_threads:  # bound memory
                        pending.popleft().result()
                for f in pending:
                    f.result()
        finally:
            self.bar.close()

    def run_isolated(self, todo: list[SourceItem]) -> None:
        """Items whose earlier attempt never finished (the process died): one at a time, nothing ahead,
        so a poison item's next attempt is counted against it alone and costs no other item an attempt."""
        if not todo:
            return
        for item in todo:
            self.dispatch([self.fetch(item)], lambda fn, *args, **kwargs: fn(*args, **kwargs))


def write_summary(out: Bucket, key: str, summary: dict, changed: bool, tries: int = 20) -> None:
    """The shard's summary, appending this invocation to its history; read-modify-write with ``If-Match``,
    so two pods of one shard finishing together both land. ``processed`` counts every invocation."""
    invocation = {k: summary[k] for k in ("started", "ended", "processed", "skipped", "held", "items_per_second")}
    for _ in range(tries):
        current = out.get_versioned(key)
        old = json.loads(current.data) if current is not None else None
        if old is not None and not changed:
            return  # nothing was done: keep the earlier summary (a re-run is a no-op)
        history = (old or {}).get("invocations", []) + [invocation]
        body = summary | {"invocations": history, "processed": sum(i.get("processed", 0) for i in history)}
        try:
            out.put_if(key, json_bytes(body), "application/json", if_match=current.etag if current else None)
            return
        except PreconditionFailed:
            continue
    raise StorageUnavailable(f"could not update {key}: too many concurrent writers")


def write_model_objects(out: Bucket, prefix: str, loaded: LoadedArchive) -> None:
    """model/ objects shared by all shards; refuses a prefix that already holds another model's run."""
    engine = loaded.engine
    record_key = RunLayout(prefix).model_record
    record = {"name": engine.bundle.name, "version": engine.bundle.version, "kind": engine.kind,
              "archive_sha256": loaded.sha256, "archive_digest": loaded.archive_digest,
              "weights_sha256": engine.bundle.card.get("weights_sha256"), "engine": loaded.engine_record}
    existing = out.get_or_none(record_key)
    if existing is not None:
        old = json.loads(existing)
        if old.get("archive_digest") != loaded.archive_digest:
            raise UsageError(f"s3://{out.name}/{prefix} already holds a run of model {old.get('name')} "
                             f"{old.get('version')} (archive digest {str(old.get('archive_digest'))[:12]}...); "
                             "use a new --output prefix for another model version")
    rel = RunLayout("")
    objects = {rel.model("model.json"): (loaded.directory / "model.json").read_bytes(),
               rel.model("model_card.json"): (loaded.directory / "model_card.json").read_bytes()}
    if (loaded.directory / "unit_labels.json").is_file():
        objects[rel.model("unit_labels.json")] = (loaded.directory / "unit_labels.json").read_bytes()
    if engine.kind == "ddsm":
        fc = engine.model.fc
        objects[rel.model("classifier.npz")] = npz_bytes({"weight": fc.weight.detach().cpu().numpy().astype(np.float32),
                                                     "bias": fc.bias.detach().cpu().numpy().astype(np.float32)})
    objects[manifest.MODEL_RECORD] = json_bytes(record)  # last: the prefix now belongs to this model
    for name, data in objects.items():
        key = RunLayout(prefix).key(name)
        if out.sha256_of(key) != sha256_bytes(data):
            out.put(key, data, content_type(name))


def run_batch(options: RunOptions) -> ShardResult:
    """Run one shard (``options.shard`` of ``options.shards``) and, if it is the last, merge the run.

    Raises UsageError / S3ConfigError / StorageConfigError / ArchiveError / SourceError for problems
    a person must fix (the CLI maps them to exit 2); per-item problems end up in ``failures/``.
    """
    started_wall, started = manifest.now(), time.perf_counter()
    if not 0 <= options.shard < options.shards:
        raise UsageError(f"shard index {options.shard} is outside 0..{options.shards - 1}")
    if options.batch_size < 1 or options.top_k < 0:
        raise UsageError("--batch-size must be >= 1 and --top-k >= 0")
    if options.max_attempts < 1:
        raise UsageError("--max-attempts must be >= 1")
    config = storage_config(options)
    bucket_name, prefix = parse_s3_url(options.output)
    out = Bucket(config, bucket_name, options.retry)
    out.ensure(create=True)
    source_pacs, sink_pacs = connect_pacs(options)  # a wrong password fails here, before any work
    try:
        source = open_source(options.input, lambda: config, kind=options.model, pacs=source_pacs,
                             study=options.study, series=options.series, modality=options.modality)
    except dicomweb.PacsConfigError as err:
        raise UsageError(str(err)) from None
    sink = DicomSink(sink_pacs, out, prefix) if sink_pacs is not None else None
    # as served (the archive's speed-ups), so batch == online; eager is within float32 rounding: not a resume change
    loaded = load_archive(options.archive, options.model, options.device, options.amp, options.eager)
    writer = Writer(out, prefix)
    try:
        if options.threads:
            torch.set_num_threads(options.threads)
        try:
            shard_run = ShardRun(options, out, prefix, loaded, source, writer, sink)
        except InputError as err:
            raise UsageError(f"bad option: {err.message}") from None
        pseudonyms = open_pseudonyms(out, prefix, options.id_key)
        items, truth_origin = plan_items(shard_run.source, loaded.engine.kind, loaded.engine.bundle.class_names,
                                         options.labels, options.split, pseudonyms=pseudonyms)
        write_model_objects(out, prefix, loaded)
        fingerprint = check_or_record(out, prefix, {
            "archive_digest": loaded.archive_digest, "api_version": API_VERSION, "kind": loaded.engine.kind,
            **asdict(shard_run.request_options), "split": options.split, "truth": truth_origin,
            **compute_fingerprint(loaded.engine.device, options.amp)})
        record_sources(out, prefix, {i.item_id: i.key for i in items}, pseudonyms.cases)
        mine = [i for i in items if shard_of(i.item_id, options.shards) == options.shard]
        complete = manifest.listed_ids(out, prefix, "items", "/" + COMPLETE)
        shard_run.previous_failures = manifest.listed_ids(out, prefix, "failures", ".json")
        attempted = manifest.listed_ids(out, prefix, "attempts", ".json")
        todo = [i for i in mine if i.item_id not in complete]
        if sink is not None:  # complete before --stow was given: their derived objects still go to the PACS
            stored = manifest.listed_ids(out, prefix, "items", "/" + MARKER)
            shard_run.stow_only = {i.item_id for i in mine if i.item_id in complete and i.item_id not in stored}
            todo += [i for i in mine if i.item_id in shard_run.stow_only]
        result = shard_run.result
        result.items, result.skipped = len(mine), len(mine) - len(todo)
        loop_started = time.perf_counter()
        if todo:
            writer.start()
        shard_run.run([i for i in todo if i.item_id not in attempted])
        shard_run.run_isolated([i for i in todo if i.item_id in attempted])
        result.loop_seconds = time.perf_counter() - loop_started
        result.seconds = time.perf_counter() - started
        summary_key = RunLayout(prefix).shard(options.shard, options.shards)
        summary = {"shard": options.shard, "shards": options.shards, "items": result.items,
                   "processed": result.processed, "skipped": result.skipped, "held": result.held,
                   "failed": [{"id": i, "error": c} for i, c in sorted(result.failed.items())],
                   "started": started_wall, "ended": manifest.now(), "seconds": round(result.seconds, 3),
                   "items_per_second": round(result.items_per_second, 3), "arguments": options.arguments(),
                   "archive_sha256": loaded.sha256, "archive_digest": loaded.archive_digest,
                   "engine": loaded.engine_record, "device": describe_device(loaded.engine.device),
                   "amp": options.amp, "fingerprint": fingerprint,
                   "code_version": manifest.code_version(), "truth": truth_origin, "source_items": len(items)}
        try:
            write_summary(out, summary_key, summary, changed=bool(todo))
            if options.merge:
                keys = manifest.shard_keys(out, prefix)
                if options.shards in manifest.complete_shard_sets(keys):
                    from batch.merge import merge

                    outcome = merge(options.output, s3=config, archive=None, progress=options.progress,
                                    retry=options.retry, shards=options.shards, writer=writer)
                    result.merged, result.merge_wrote = True, outcome.wrote
                    result.run_failures = outcome.run["counts"]["failed"]
        except StorageUnavailable as err:
            log.error("could not finish the shard's bookkeeping: %s", err)
            result.failed.setdefault("(shard summary)", "storage_unavailable")
        return result
    finally:
        writer.stop()
        loaded.close()


def connect_pacs(options: RunOptions) -> tuple[dicomweb.Pacs | None, dicomweb.Pacs | None]:
    """The DICOMweb source and sink (``--stow``), each checked with one request (PacsAuthError: exit 2).

    Both use the same credentials (``--dicomweb-env`` / MEDXAI_DICOMWEB_*): usually one PACS.
    """
    source_url = options.input if dicomweb.is_dicomweb_url(options.input) else None
    if source_url is None and options.stow is None:
        return None, None
    config = options.dicomweb or dicomweb.DicomwebConfig.from_env(env_file=options.dicomweb_env)
    source = dicomweb.connect(source_url, config) if source_url else None
    if options.stow is None:
        return source, None
    if source is not None and dicomweb.check_url(options.stow) == source.url:
        return source, source  # one PACS: one session
    return source, dicomweb.connect(options.stow, config)


def compute_fingerprint(device: torch.device, amp: bool) -> dict:
    """The fingerprint's share of where and how a run computes: the device *type* and amp, each only when
    not the default (so CPU fp32 runs keep the fingerprint they had before devices existed).

    A resume on another device type is refused: GPU results differ from CPU ones within tolerance (not
    bit for bit), and a run's merged analyses (similarity index, unit atlas, metrics) must not mix the
    two. cuda:0 vs cuda:1 is the same computation and may resume each other; the exact device (and
    GPU model) of each invocation is kept in its shard summary.
    """
    out: dict = {}
    if device.type != "cpu":
        out["device"] = device.type
    if amp:
        out["amp"] = True
    return out


def result_dict(result: ShardResult) -> dict:
    return {**asdict(result), "exit_code": result.exit_code, "items_per_second": result.items_per_second}
