"""The demo after training: serve, predict online, run both batch jobs into MinIO, open the UI.

1. Start MinIO and TorchServe; ask each model for a prediction with units and a heatmap, through
   the same client a hospital system would use (JSON + PNG / NIfTI files under ``build/demo/``).
2. Upload the held-out split of each synthetic set (with its ground-truth index and masks) to
   MinIO, as a hospital would drop studies into object storage, and run the batch job over it with
   the same archives: per-item results, unit atlas, similarity index, quality report.
3. Store the synthetic sets' DICOM studies in the local Orthanc and run the batch job from it, back
   into it (derived SR, parametric maps, RGB overlays) and into MinIO (``devstack/pacs_demo.py``).
4. Start the Streamlit UI on those runs.

Inputs are synthetic, so every printed prediction can be checked against the generator's truth.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from devstack.stack import print_endpoints, start, start_ui
from medxplain_client import Client
from medxplain_client.outputs import write_outputs
from medxplain_contract.layout import join
from medxplain_contract.storage import Bucket, S3Config

DEMO_BUCKET = "medxai"
# cheap methods keep the demo short; every method is available online and via --explain
BATCH_EXPLAIN = {"ddsm": ("cam",), "adni": ("gradcam", "sensitivity")}
INDEX = {"ddsm": "images.csv", "adni": "subjects.csv"}
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
    runs = run_batches(build, S3Config.from_env(env_file=Path(credentials["admin"])),
                       S3Config.from_env(env_file=Path(credentials["batch"])))
    from devstack.pacs_demo import push_to_pacs  # DICOM in, DICOM out: the local Orthanc (issue 14)
    digests = {m: (build / "model-store" / f"{m}.mar.sha256").read_text().split()[0][:12] for m in INDEX}
    pacs_runs = push_to_pacs(build, info["orthanc"], S3Config.from_env(env_file=Path(credentials["batch"])), digests)
    runs |= {f"{m}-pacs": url for m, url in pacs_runs.items()}
    info = start_ui(build / "stack")
    print()
    print_endpoints(info)
    for model, url in runs.items():
        print(f"batch run {model:5s}   {url}  (manifest run.json, quality report report.json)")
    print(f"\nreview the runs, annotate units and look up similar images at {info['ui']['url']}")
    print("\nstop the services with `make stop`")
