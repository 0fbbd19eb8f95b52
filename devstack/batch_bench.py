"""``python -m devstack.batch_bench``: batch throughput vs the model's raw forward loop, in one process.

The batch side is the real job (read, decode, forward, units, features, encode, upload to a real
MinIO started here, completion markers); the raw side is only the model's forward pass over
tensors decoded beforehand, with the same batch size. The ratio shows how much of the forward
pass's speed the job keeps (target >= 0.9: decoding and uploads overlap with compute). The raw
loop runs before and after the job and its mean is used, since other load on the machine drifts.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from batch.archive import load_archive
from batch.runner import RunOptions, run_batch
from batch.sources import INDEX_FILES
from devstack.services import MinioServer
from medxplain_contract.storage import S3Config
from medxplain_engine.engine import EngineRequest
from medxplain_models.preprocess import ddsm_normalise


def copy_subset(data_dir: Path, kind: str, n: int, dest: Path) -> int:
    """The first ``n`` indexed inputs of a synthetic set, with an index naming only them."""
    with open(data_dir / INDEX_FILES[kind], newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)[:n]
    for row in rows:
        (dest / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / row["path"], dest / row["path"])
        row["mask_path"] = ""  # masks are not part of the measured work
    with open(dest / INDEX_FILES[kind], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def raw_forward_loop(archive: Path, source: Path, kind: str, batch_size: int) -> float:
    """Items/s of the model's forward pass alone, over inputs decoded and resized beforehand."""
    loaded = load_archive(archive, kind)
    try:
        engine, model = loaded.engine, loaded.engine.model
        with open(source / INDEX_FILES[kind], newline="") as f:
            paths = [source / r["path"] for r in csv.DictReader(f)]
        tensors = [engine.prepare(EngineRequest(p.read_bytes(), {})).inputs for p in paths]
        batches = [tensors[i:i + batch_size] for i in range(0, len(tensors), batch_size)]

        @torch.inference_mode()
        def forward(batch: list[torch.Tensor]) -> None:
            if kind == "adni":
                torch.softmax(model(torch.cat(batch)), dim=1)
                return
            groups = [torch.cat(batch)] if len({t.shape for t in batch}) == 1 else batch
            for x in groups:
                torch.softmax(model.class_map(model.features(ddsm_normalise(x[:, 0]))), dim=1)

        forward(batches[0])  # warm-up: first-call allocations and kernel selection
        started = time.perf_counter()
        for batch in batches:
            forward(batch)
        return len(tensors) / (time.perf_counter() - started)
    finally:
        loaded.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.batch_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=Path("build/model-store/ddsm.mar"))
    parser.add_argument("--data", type=Path, default=Path("build/data/ddsm"), help="a synthetic set (with its index)")
    parser.add_argument("--model", choices=["ddsm", "adni"], default="ddsm")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    args = parser.parse_args(argv)
    for path in (args.archive, args.data / INDEX_FILES[args.model]):
        if not path.exists():
            print(f"error: {path} not found (run `make archives` first)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medxai-batch-bench-") as tmp:
        root = Path(tmp)
        n = copy_subset(args.data, args.model, args.items, root / "input")
        server = MinioServer(data_dir=root / "minio", log_path=root / "minio.log").start()
        try:
            s3 = S3Config(server.endpoint, False, server.access_key, server.secret_key)
            before = raw_forward_loop(args.archive, root / "input", args.model, args.batch_size)
            result = run_batch(RunOptions(model=args.model, archive=args.archive, input=str(root / "input"),
                                          output="s3://bench/run", batch_size=args.batch_size, threads=args.threads,
                                          s3=s3, progress=False, merge=False))
            after = raw_forward_loop(args.archive, root / "input", args.model, args.batch_size)
        finally:
            server.stop()
    if result.failed or result.processed != n:
        print(f"error: the batch run did not process every item: {result.summary_line()}", file=sys.stderr)
        return 1
    raw = (before + after) / 2
    ratio = result.items_per_second / raw
    print(f"batch job ({args.model}, {n} items, batch size {args.batch_size}, {args.threads} threads, no --explain, "
          f"objects written to MinIO): {result.items_per_second:.2f} items/s")
    print(f"raw forward loop over decoded tensors, same batch size: {raw:.2f} items/s "
          f"(before {before:.2f}, after {after:.2f})")
    print(f"ratio batch / raw: {ratio:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
