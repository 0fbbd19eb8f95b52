"""Peak memory and time of the merge against the number of items: ``python -m devstack.bench_merge``.

Starts a real MinIO (devstack.services.MinioServer, free ports, a temporary folder), writes a
synthetic committed run per size (devstack.synthetic_run: result.json + features.npz + marker per
item, clustered embeddings), then merges each in a fresh child process and prints that process's
peak RSS and wall time. Peak RSS is ``VmHWM`` of /proc/self/status, not ``getrusage``'s
``ru_maxrss``: Linux keeps ``ru_maxrss`` across fork + exec, so a child would report at least the
parent's RSS at fork time (the parent that just wrote 10^5 items). Two modes per size, back to back on the same run:
``stream`` (batch.merge as it is: records one window at a time) and ``in-memory`` (every record
read into a list first, then the same analyses: what the merge did before it streamed). The last
line gives the ratios between the largest and smallest size. Runs above ``--ann-threshold`` items
also build the FAISS index, which holds items x dim x 4 bytes (printed as ``ann_index_mib``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_kib() -> int:
    """This process's own peak resident set size (VmHWM, KiB; reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(prefix: str, bucket: str, mode: str, ann_threshold: int) -> None:
    """Merge (or read-all-then-analyse) one run; print peak RSS and time as JSON."""
    import batch.analyses
    import batch.merge  # noqa: F401 - imported before the baseline: the model code's imports (torch) weigh ~0.9 GB

    baseline_kib = peak_rss_kib()
    started = time.perf_counter()
    if mode == "stream":
        from batch.merge import merge_run

        run = merge_run(f"s3://{bucket}/{prefix}", ann_threshold=ann_threshold, force=True)
        items = run["counts"]["complete"]
    else:
        from batch.analyses import build_run_outputs
        from batch.merge import read_model, read_records
        from medxplain_contract.runs import RunReader
        from medxplain_contract.storage import Bucket, S3Config

        reader = RunReader(Bucket(S3Config.from_env(), bucket), prefix)
        records = list(read_records(reader, reader.item_ids()))
        build_run_outputs(records, read_model(reader), ann_threshold=ann_threshold)
        items = len(records)
    rss_kib = peak_rss_kib()
    print(json.dumps({"items": items, "peak_rss_mib": round(rss_kib / 1024, 1),
                      "baseline_rss_mib": round(baseline_kib / 1024, 1),
                      "merge_rss_mib": round((rss_kib - baseline_kib) / 1024, 1),
                      "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated item counts (default 1000,10000)")
    parser.add_argument("--full", action="store_true", help="sizes 10000,100000 (writing 10^5 items takes a while)")
    parser.add_argument("--dim", type=int, default=64, help="embedding / pooled units per item (default 64)")
    parser.add_argument("--ann-threshold", type=int, default=None,
                        help="items above which the merge builds the FAISS index (default: the merge's)")
    parser.add_argument("--modes", default="stream,in-memory", help="stream, in-memory or both (default)")
    parser.add_argument("--child", nargs=3, metavar=("PREFIX", "BUCKET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from batch.analyses.ann import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.ann_threshold is None else args.ann_threshold
    if args.child:
        child(*args.child, threshold)
        return
    from devstack.services import MinioServer
    from devstack.synthetic_run import write_run
    from medxplain_contract.storage import Bucket

    sizes = [10_000, 100_000] if args.full else [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="medxai-bench-merge-") as folder:
        server = MinioServer(data_dir=Path(folder) / "data", log_path=Path(folder) / "minio.log").start()
        try:
            config = server.admin_config()
            bucket = Bucket(config, "bench-merge")
            bucket.ensure(create=True)
            env = {**os.environ, "PYTHONPATH": str(REPO), "MEDXAI_S3_ENDPOINT": config.endpoint_url,
                   "MEDXAI_S3_ACCESS_KEY": config.access_key, "MEDXAI_S3_SECRET_KEY": config.secret_key}
            results = {}
            for n in sizes:
                prefix = f"runs/n{n}"
                started = time.perf_counter()
                write_run(bucket, prefix, n, args.dim)
                written = round(time.perf_counter() - started, 1)
                for mode in args.modes.split(","):
                    proc = subprocess.run([sys.executable, "-m", "devstack.bench_merge", "--child", prefix,
                                           bucket.name, mode, "--ann-threshold", str(threshold)],
                                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
                    if proc.returncode:
                        raise SystemExit(f"merge of {n} items ({mode}) failed:\n{proc.stderr[-2000:]}")
                    line = {"mode": mode, "dim": args.dim, "write_seconds": written,
                            "ann": n > threshold, "ann_index_mib": round(n * args.dim * 4 / 2**20, 1) if n > threshold
                            else 0.0, **json.loads(proc.stdout.strip().splitlines()[-1])}
                    results[(mode, n)] = line
                    print(json.dumps(line), flush=True)
            for mode in args.modes.split(","):
                small, large = results[(mode, sizes[0])], results[(mode, sizes[-1])]
                print(json.dumps({"mode": mode, "items_ratio": round(sizes[-1] / sizes[0], 1),
                                  "peak_rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 2),
                                  "merge_rss_ratio": round(large["merge_rss_mib"] / max(small["merge_rss_mib"], 1), 2),
                                  "seconds_ratio": round(large["seconds"] / max(small["seconds"], 0.1), 1)}),
                      flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
