"""``python -m batch``: run one shard of a batch inference job into object storage, or merge a run.

    run     infer over a local folder, s3:// prefix or DICOMweb service and write per-item objects (resumable)
    merge   build run-level outputs and run.json once every shard has finished (idempotent)

Storage settings: MEDXAI_S3_ENDPOINT, MEDXAI_S3_ACCESS_KEY(_FILE), MEDXAI_S3_SECRET_KEY(_FILE),
MEDXAI_S3_REGION, or an env file (--s3-env / MEDXAI_S3_ENV_FILE, e.g. build/stack/minio.env).
PACS settings (a DICOMweb --input or --stow): MEDXAI_DICOMWEB_USERNAME(_FILE), MEDXAI_DICOMWEB_PASSWORD(_FILE),
or an env file (--dicomweb-env / MEDXAI_DICOMWEB_ENV_FILE, e.g. build/stack/orthanc.env); never in the URL.
Exit codes: 0 all items done, 1 some items failed (see failures/ in the run) or failed their
integrity check, 2 usage, settings or credential errors (also: a re-run with other result options).
Fault injection for drills and tests: MEDXAI_FAULT_KILL_ON_SOURCE (see batch/faults.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from batch.archive import ArchiveError
from batch.fingerprint import FingerprintMismatch
from batch.merge import MergeError, merge_run
from batch.pseudonyms import PseudonymError
from batch.runner import RunOptions, UsageError, run_batch
from batch.sources import SourceError
from medxplain_contract.dicomweb import PacsError
from medxplain_contract.storage import S3ConfigError, StorageConfigError, StorageUnavailable
from medxplain_engine.device import DEVICE_CHOICES, DeviceError, resolve_device

USER_ERRORS = (UsageError, ArchiveError, SourceError, S3ConfigError, StorageConfigError, MergeError,
               FingerprintMismatch, PseudonymError, DeviceError, PacsError)  # PacsError: at start (credentials,
# reachability, the search); a PACS failure on one item is that item's failure record


def _shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {value}: need 0 <= I < N")
    return index, count


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _device(value: str) -> str:
    """Checked before anything is read or written: a bad or absent device is a usage error (exit 2)."""
    try:
        resolve_device(value)
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value.strip().lower()


def _non_negative(value: str) -> int:
    return 0 if value.strip() == "0" else _positive(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one shard of a batch job", description=(
        "Infer over SOURCE with the engine inside the .mar and write items/<id>/... under the output prefix. "
        "Complete items are skipped, so re-running the same command resumes."))
    run.add_argument("--model", required=True, choices=["ddsm", "adni"])
    run.add_argument("--archive", required=True, type=Path, help="the .mar TorchServe serves")
    run.add_argument("--input", required=True, metavar="SOURCE",
                     help="local folder (recursive), s3://bucket/prefix, or a DICOMweb root http(s)://host/dicom-web "
                          "(QIDO-RS search, WADO-RS retrieve: one item per instance for ddsm, per series for adni); "
                          "an images.csv (ddsm) / subjects.csv (adni) index at a folder's root defines the items and "
                          "their ground truth; for adni a folder of .dcm files is one series item")
    run.add_argument("--study", metavar="UID", help="DICOMweb source: only this study")
    run.add_argument("--series", metavar="UID", help="DICOMweb source: only this series")
    run.add_argument("--modality", metavar="CODE",
                     help="DICOMweb source: only series of this modality (default MG for ddsm, MR for adni; 'any': "
                          "no filter, so non-image objects of a study become failure records)")
    run.add_argument("--stow", metavar="URL",
                     help="DICOMweb root to STOW-RS each item's derived objects to (SR, parametric map and RGB "
                          "overlay per method), after its results are in the output prefix; DICOM inputs only")
    run.add_argument("--dicomweb-env", type=Path, metavar="FILE",
                     help="KEY=VALUE file with MEDXAI_DICOMWEB_* credentials (default: MEDXAI_DICOMWEB_ENV_FILE)")
    run.add_argument("--output", required=True, metavar="s3://BUCKET/PREFIX")
    run.add_argument("--explain", default="", metavar="METHODS", help="comma-separated attribution methods")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--shard", type=_shard, metavar="I/N", help="run shard I of N (0-based)")
    group.add_argument("--shards", type=_positive, metavar="N",
                       help="N shards; the index comes from JOB_COMPLETION_INDEX (Kubernetes Indexed Job)")
    run.add_argument("--labels", type=Path, metavar="CSV",
                     help="ground truth: path (relative to SOURCE), label or label_name, optional case_id, mask_path")
    run.add_argument("--split", help="only index rows whose 'split' column has this value (e.g. test)")
    run.add_argument("--batch-size", type=_positive, default=4)
    run.add_argument("--top-k", type=_non_negative, default=8, help="ranked units per item")
    run.add_argument("--threads", type=_positive, help="torch threads for the forward pass")
    run.add_argument("--eager", action="store_true",
                     help="leave out the CPU speed-ups the archive's model-config turns on (DDSM channels-last; "
                          "results differ within float32 rounding)")
    run.add_argument("--device", type=_device, default="cpu", metavar=DEVICE_CHOICES,
                     help="where the engine computes (default cpu; auto = CUDA when available). A resume must "
                          "use the same device type: a run's items are all CPU or all CUDA results")
    run.add_argument("--amp", action="store_true",
                     help="mixed precision (autocast: fp16 on CUDA, bf16 on CPU) for the forward pass when "
                          "--explain is empty; recorded in each result's model.precision and the run's fingerprint")
    run.add_argument("--io-threads", type=_positive, default=4, help="threads for reading and uploading")
    run.add_argument("--s3-env", type=Path, metavar="FILE", help="KEY=VALUE file with MEDXAI_S3_* settings")
    run.add_argument("--id-key-file", type=Path, metavar="FILE",
                     help="secret (>= 16 bytes) for the pseudonymous item ids; default: a random key kept in the "
                          "run's private/sources.json. The same key gives the same ids across runs")
    run.add_argument("--max-attempts", type=_positive, default=3,
                     help="attempts at an item that killed the process before it goes to failures/ (default 3)")
    run.add_argument("--no-merge", action="store_true", help="do not merge even if this is the last shard")
    run.add_argument("--no-progress", action="store_true")
    merge = sub.add_parser("merge", help="build run-level outputs and run.json (idempotent)",
                           description="Merge a run once every shard summary exists; writes run.json last.")
    merge.add_argument("--output", required=True, metavar="s3://BUCKET/PREFIX")
    merge.add_argument("--archive", type=Path, help="optional: refuse to merge unless the run used this .mar")
    merge.add_argument("--s3-env", type=Path, metavar="FILE")
    merge.add_argument("--force", action="store_true",
                       help="rebuild and re-verify every item even if nothing changed since the last merge")
    merge.add_argument("--ann-threshold", type=int, default=None, metavar="N",
                       help="runs with more than N items get the approximate (FAISS) similarity index "
                            "(default: batch.analyses.ann.DEFAULT_THRESHOLD)")
    merge.add_argument("--no-progress", action="store_true")
    return parser


def _shard_from(args: argparse.Namespace) -> tuple[int, int]:
    if args.shard:
        return args.shard
    if args.shards:
        index = os.environ.get("JOB_COMPLETION_INDEX")
        if index is None or not index.isdigit():
            raise UsageError("--shards needs JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job) or use --shard I/N")
        if int(index) >= args.shards:
            raise UsageError(f"JOB_COMPLETION_INDEX={index} is not below --shards {args.shards}")
        return int(index), args.shards
    return 0, 1


def _id_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().strip()
    except OSError as err:
        raise UsageError(f"--id-key-file: cannot read it ({type(err).__name__})") from None


def _run(args: argparse.Namespace) -> int:
    index, count = _shard_from(args)
    options = RunOptions(model=args.model, archive=args.archive, input=args.input, output=args.output,
                         explain=tuple(m.strip() for m in args.explain.split(",") if m.strip()), shard=index,
                         shards=count, labels=args.labels, split=args.split, batch_size=args.batch_size, top_k=args.top_k,
                         threads=args.threads, io_threads=args.io_threads, s3_env=args.s3_env,
                         progress=not args.no_progress, merge=not args.no_merge,
                         id_key=_id_key(args.id_key_file), max_attempts=args.max_attempts, device=args.device,
                         amp=args.amp, eager=args.eager, study=args.study, series=args.series,
                         modality=args.modality, stow=args.stow, dicomweb_env=args.dicomweb_env)
    result = run_batch(options)
    print(result.summary_line())
    for item_id, code in sorted(result.failed.items()):
        print(f"  failed: {item_id} ({code})")
    if result.merged:
        print(f"run merged: {args.output.rstrip('/')}/run.json ({result.run_failures} failed items in the run)")
    elif count > 1:
        print("other shards still running: the last one to finish merges (or run `python -m batch merge`)")
    return result.exit_code


def _merge(args: argparse.Namespace) -> int:
    run = merge_run(args.output, s3_env=args.s3_env, archive=args.archive, progress=not args.no_progress,
                    force=args.force, ann_threshold=args.ann_threshold)
    counts = run["counts"]
    print(f"run merged: {args.output.rstrip('/')}/run.json: {counts['items']} items, {counts['complete']} complete, "
          f"{counts['failed']} failed, {counts.get('integrity_failed', 0)} failed the integrity check; "
          f"{len(run['outputs'])} run-level objects")
    for problem in run.get("integrity", []):
        print(f"  integrity: {problem['key']} ({problem['error']})")
    return 1 if counts["failed"] or counts.get("integrity_failed") else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args) if args.command == "run" else _merge(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StorageUnavailable as err:
        print(f"error: storage unavailable: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: complete items are kept; re-run the same command to resume", file=sys.stderr)
        return 130
