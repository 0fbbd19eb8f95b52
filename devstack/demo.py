"""The demo after training: serve, predict online, run both batch jobs into MinIO, open the UI.

1. Start MinIO and TorchServe; ask each model for a prediction with units and a heatmap, through
   the same client a hospital system would use (JSON + PNG / NIfTI files under ``build/demo/``).
2. Upload the held-out split of each synthetic set (with its ground-truth index and masks) to
   MinIO, as a hospital would drop studies into object storage, and run the batch job over it with
   the same archives: per-item results, unit atlas, similarity index, quality report.
3. The hospital path: put held-out cases into the local Orthanc PACS as DICOM studies (mammograms
   with made-up patient tags, an MRI series per subject), run the batch job from the PACS (DICOMweb
   QIDO / WADO) to MinIO and back to the PACS (STOW-RS of the SR, parametric maps and overlays),
   and store one online ``output=dicom`` answer there as a hospital system would.
4. Start the Streamlit UI on those runs.

Inputs are synthetic, so every printed prediction can be checked against the generator's truth.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom import dcmread

from devstack.stack import print_endpoints, start, start_ui
from medxplain_client import Client
from medxplain_client.outputs import write_outputs
from medxplain_contract import dicomweb
from medxplain_contract.layout import join
from medxplain_contract.storage import Bucket, S3Config
from model_store.synth import mammo, mri_dicom

DEMO_BUCKET = "medxai"
# cheap methods keep the demo short; every method is available online and via --explain
BATCH_EXPLAIN = {"ddsm": ("cam",), "adni": ("gradcam", "sensitivity")}
INDEX = {"ddsm": "images.csv", "adni": "subjects.csv"}
PACS_CASES = 2  # held-out inputs per model put into the PACS (the batch job from the PACS runs over them)
DEMO_REQUESTS = {"ddsm": {"explain": ["cam", "gradcam"], "top_k": 5},
                 "adni": {"explain": ["gradcam", "occlusion"], "top_k": 5}}


def _pick(data_dir: Path, index: str) -> tuple[Path, str]:
    """A held-out case with the highest label (a lesion / AD case if the test split has one)."""
    with open(data_dir / index, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = max(rows, key=lambda r: int(r["label"]))
    truth = row.get("label_name") or ("normal", "benign", "malignant")[int(row["label"])]
    return data_dir / row["path"], truth


def stage_held_out(s3: S3Config, data_dir: Path, index: str, prefix: str) -> int:
    """Upload the test split's files, masks and a test-only index under s3://medxai/<prefix>/."""
    bucket = Bucket(s3, DEMO_BUCKET)
    bucket.ensure(create=True)
    with open(data_dir / index, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if r["split"] == "test"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    data = out.getvalue().encode()
    bucket.put(join(prefix, index), data, content_type="text/csv")
    for row in rows:
        for column in ("path", "mask_path"):
            if row.get(column):
                bucket.put_file(join(prefix, row[column]), data_dir / row[column])
    return len(rows)


def run_batches(build: Path, admin: S3Config, s3: S3Config) -> dict[str, str]:
    """One batch run per model over its staged held-out split; returns model -> run URL.

    The inputs are staged with the administrator's credentials (as a hospital's ingest would drop
    them); the job itself runs as the batch user, which may read inputs but not write them.
    """
    from batch.runner import RunOptions, run_batch

    runs = {}
    for model, index in INDEX.items():
        n = stage_held_out(admin, build / "data" / model, index, f"inputs/{model}-test")
        # one run per archive version: a rebuilt archive (new engine code or weights) gets a new prefix,
        # the same archive resumes its run (re-runs store nothing twice); earlier runs stay readable
        digest = (build / "model-store" / f"{model}.mar.sha256").read_text().split()[0][:12]
        output = f"s3://{DEMO_BUCKET}/runs/{model}-demo-{digest}"
        print(f"\nbatch {model}: {n} held-out inputs from s3://{DEMO_BUCKET}/inputs/{model}-test -> {output}")
        result = run_batch(RunOptions(model=model, archive=build / "model-store" / f"{model}.mar",
                                      input=f"s3://{DEMO_BUCKET}/inputs/{model}-test", output=output,
                                      explain=BATCH_EXPLAIN[model], s3=s3, threads=2))
        print("  " + result.summary_line())
        runs[model] = output
    return runs


def write_pacs_studies(build: Path, out: Path) -> dict[str, list[Path]]:
    """DICOM studies of the first held-out cases: mammograms (one file per view) and MRI series (one file per
    slice), written by the synthetic generators with made-up patient tags; model -> files."""
    files: dict[str, list[Path]] = {"ddsm": [], "adni": []}
    data = build / "data" / "ddsm"
    with open(data / "images.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"][:PACS_CASES]
    for row in rows:
        image = np.asarray(Image.open(data / row["path"]))
        image_id = Path(row["path"]).stem
        path = out / "ddsm" / f"{image_id}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        mammo.write_dicom(path, image, image_id, int(row["case_id"].lstrip("C")) - 1, row["side"], row["view"],
                          seed=0)
        files["ddsm"].append(path)
    data = build / "data" / "adni"
    with open(data / "subjects.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"][:PACS_CASES]
    for i, row in enumerate(rows):
        img = nib.load(data / row["path"])
        files["adni"] += mri_dicom.write_series(np.asarray(img.dataobj, dtype=np.float32), img.affine,
                                                out / "adni" / row["subject_id"], row["subject_id"], seed=0,
                                                subject_index=100 + i)
    return files


def run_pacs(build: Path, info: dict, s3: S3Config, client: Client) -> dict[str, str]:
    """Studies into Orthanc, batch runs from it to MinIO and back to it, one online answer stored there."""
    from batch.runner import RunOptions, run_batch

    pacs_info = info["orthanc"]
    url, env_file = pacs_info["dicomweb"], Path(pacs_info["credentials_file"])
    pacs = dicomweb.connect(url, dicomweb.DicomwebConfig.from_env(env_file=env_file))
    studies = write_pacs_studies(build, build / "demo" / "pacs-inputs")
    for model, paths in studies.items():
        pacs.store([dcmread(p) for p in paths])
    series = len({p.parent for p in studies["adni"]})
    print(f"\nPACS: stored {len(studies['ddsm'])} mammograms and {series} MRI series ({len(studies['adni'])} "
          f"slices) with made-up patient tags in {url}")
    runs = {}
    for model in INDEX:
        digest = (build / "model-store" / f"{model}.mar.sha256").read_text().split()[0][:12]
        output = f"s3://{DEMO_BUCKET}/runs/{model}-pacs-{digest}"
        print(f"batch {model}: DICOMweb {url} -> {output} and STOW-RS back to the PACS")
        result = run_batch(RunOptions(model=model, archive=build / "model-store" / f"{model}.mar", input=url,
                                      output=output, explain=BATCH_EXPLAIN[model][:1], stow=url,
                                      dicomweb_env=env_file, s3=s3, threads=2))
        print("  " + result.summary_line())
        runs[f"{model} (PACS)"] = output
    parts = client.dicom("ddsm", studies["ddsm"][0], methods="cam,gradcam", top_k=5)  # what an integrator does
    pacs.store([dcmread(io.BytesIO(part)) for part in parts])
    print(f"online output=dicom: {len(parts)} objects (SR, parametric maps, overlays) for one mammogram, stored")
    print(f"the PACS now holds {pacs.count_instances()} instances: open {pacs_info['explorer']} "
          f"(user and password in {env_file})")
    return runs


def run_demo(build: Path) -> None:
    info = start(build / "stack", build / "model-store")
    ts = info["torchserve"]
    out_dir = build / "demo"
    cases = {"ddsm": _pick(build / "data" / "ddsm", "images.csv"),
             "adni": _pick(build / "data" / "adni", "subjects.csv")}
    with Client(ts["inference"], key_file=ts["token_file"], timeout=600) as client:
        for model, (path, truth) in cases.items():
            params = DEMO_REQUESTS[model]
            result = client.explain(model, path, methods=params["explain"], top_k=params["top_k"])
            written = write_outputs(result, out_dir, f"{model}_{path.name.split('.')[0]}")
            pred = result["prediction"]
            probs = ", ".join(f"{k} {v:.3f}" for k, v in pred["probabilities"].items())
            print(f"\n{model}: {path.name} (ground truth: {truth})")
            print(f"  predicted {pred['label']} ({probs})")
            print(f"  model {result['model']['name']} v{result['model']['version']}, "
                  f"archive digest {result['model']['archive_digest'][:16]}...")
            for unit in result.get("units", []):
                labels = ", ".join(unit["labels"]) or "not yet annotated"
                print(f"  unit {unit['unit']:4d}  rank {unit['rank']}  contribution {unit['contribution']:+.3f}  ({labels})")
            for region in result.get("regions", {}).get("gradcam", [])[:3]:
                print(f"  region #{region['rank']} by Grad-CAM relevance: {region['name']}")
            print("  files: " + ", ".join(str(p) for p in written))
    credentials = info["minio"]["credentials"]
    batch_s3 = S3Config.from_env(env_file=Path(credentials["batch"]))
    runs = run_batches(build, S3Config.from_env(env_file=Path(credentials["admin"])), batch_s3)
    with Client(ts["inference"], key_file=ts["token_file"], timeout=600) as client:
        runs.update(run_pacs(build, info, batch_s3, client))
    info = start_ui(build / "stack")
    print()
    print_endpoints(info)
    for model, url in runs.items():
        print(f"batch run {model:5s}   {url}  (manifest run.json, quality report report.json)")
    print(f"\nreview the runs, annotate units and look up similar images at {info['ui']['url']}")
    print("\nstop the services with `make stop`")
