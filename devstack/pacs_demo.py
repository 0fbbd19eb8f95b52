"""The demo's PACS part: synthetic DICOM studies into the local Orthanc, batch from it and back into it.

As a hospital would: the studies are in the PACS (STOW-RS of the synthetic sets' DICOM files, with
made-up patient tags), the batch job searches and retrieves them over DICOMweb, writes its results
to MinIO as usual and stores the derived objects (SR, parametric maps, RGB overlays) next to each
study, where Orthanc's explorer shows them.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from medxplain_contract import dicomweb
from medxplain_contract.storage import S3Config

EXPLAIN = {"ddsm": ("cam",), "adni": ("gradcam",)}


def _studies(data: Path, model: str) -> list[list[Path]]:
    """The synthetic set's DICOM files, one list per series (mammograms: one file each; MRI: a folder)."""
    root = data / model / "dicom"
    if model == "ddsm":
        return [[f] for f in sorted(root.glob("*.dcm"))]
    return [sorted(d.glob("*.dcm")) for d in sorted(p for p in root.glob("*") if p.is_dir())]


def push_to_pacs(build: Path, orthanc: dict, s3: S3Config, digests: dict[str, str]) -> dict[str, str]:
    """Store each set's DICOM in Orthanc, run batch PACS -> MinIO + PACS; returns model -> run URL.

    ``orthanc`` is the stack's record (``dicomweb``, ``credentials_file``); ``digests`` model -> the
    archive digest prefix its MinIO run is named after.
    """
    from batch.runner import RunOptions, run_batch

    config = dicomweb.DicomwebConfig.from_env(env_file=Path(orthanc["credentials_file"]))
    pacs = dicomweb.connect(orthanc["dicomweb"], config)
    runs = {}
    for model in ("ddsm", "adni"):
        series = [s for s in _studies(build / "data", model) if s]
        if not series:
            print(f"\nPACS {model}: the synthetic set has no DICOM files (regenerate it: rm -r build/data/{model})")
            continue
        for files in series:
            pacs.store([pydicom.dcmread(f) for f in files])
        output = f"s3://medxai/runs/{model}-pacs-{digests[model]}"
        print(f"\nPACS {model}: {sum(map(len, series))} DICOM files ({len(series)} series) stored in {pacs.url}; "
              f"batch from it -> {output} and back into it")
        # every MG (ddsm) / MR (adni) series of the PACS: the demo's own; derived series are never inputs
        result = run_batch(RunOptions(model=model, archive=build / "model-store" / f"{model}.mar", input=pacs.url,
                                      stow=pacs.url, output=output, explain=EXPLAIN[model], s3=s3, dicomweb=config,
                                      threads=2))
        print("  " + result.summary_line())
        runs[model] = output
    print(f"derived objects (SR, parametric maps, RGB overlays) next to each study: {orthanc['explorer']} "
          f"(user and password in {orthanc['credentials_file']})")
    return runs
