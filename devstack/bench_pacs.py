"""What the PACS costs a batch run, per image: DICOMweb retrieve vs a local folder, and ``--stow`` on top.

Starts its own MinIO and Orthanc (free loopback ports), stores the DICOM files of ``--data`` in
Orthanc, then runs the batch job over the same images in three ways, round after round, the order
rotating each round (so load changes and warm-up hit every side alike), each into a fresh output prefix:

    folder   --input <folder of .dcm>            (the reference)
    pacs     --input <DICOMweb>                  (+ QIDO search, WADO-RS retrieve)
    stow     --input <DICOMweb> --stow <same>    (+ rendering SR / parametric maps / overlays, STOW-RS)

and prints seconds per image (median over rounds) and the ratios to ``folder``. A command, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import pydicom

from devstack.services import MinioServer, OrthancServer
from medxplain_contract import dicomweb
from medxplain_contract.storage import S3Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_pacs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="ddsm .mar (its engine code must be this one)")
    parser.add_argument("--data", type=Path, required=True, help="folder with DICOM mammograms (e.g. build/data/ddsm/dicom)")
    parser.add_argument("--explain", default="cam", help="methods (each adds a parametric map and an overlay)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from batch.runner import RunOptions, run_batch

    files = sorted(args.data.glob("*.dcm"))
    if not files:
        parser.error(f"no .dcm files in {args.data}")
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    minio = MinioServer(work / "minio", work / "minio.log").start()
    orthanc = OrthancServer(work / "orthanc").start()
    try:
        s3 = S3Config(minio.endpoint, False, minio.access_key, minio.secret_key)
        config = dicomweb.DicomwebConfig(*orthanc.auth)
        pacs = dicomweb.connect(orthanc.dicomweb_url, config)
        pacs.store([pydicom.dcmread(f) for f in files])
        folder = work / "folder"
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
        sides = {"folder": {"input": str(folder)}, "pacs": {"input": pacs.url},
                 "stow": {"input": pacs.url, "stow": pacs.url}}
        times: dict[str, list[float]] = {side: [] for side in sides}
        explain = tuple(m for m in args.explain.split(",") if m)
        order = list(sides)
        for round_ in range(args.rounds):
            for side in order[round_ % 3:] + order[:round_ % 3]:  # each side goes first in turn
                extra = sides[side]
                result = run_batch(RunOptions(model="ddsm", archive=args.archive, output=f"s3://bench/{side}-{round_}",
                                              explain=explain, s3=s3, dicomweb=config, threads=args.threads,
                                              progress=False, merge=False, **extra))
                if result.failed or result.processed != len(files):
                    raise SystemExit(f"{side}: {result.summary_line()} {result.failed}")
                times[side].append(result.loop_seconds / result.processed)
        base = statistics.median(times["folder"])
        print(f"{len(files)} DICOM mammograms, explain={args.explain}, {args.rounds} rounds, threads {args.threads}")
        for side, values in times.items():
            median = statistics.median(values)
            print(f"  {side:7s} {median * 1000:8.1f} ms/image   x{median / base:5.2f} of folder   "
                  f"(+{(median - base) * 1000:7.1f} ms)")
        print(f"  stored in Orthanc: {pacs.count_instances()} instances ({len(files)} sources)")
    finally:
        orthanc.stop()
        minio.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
