"""The demo's serving step: start the stack, then ask each model for a prediction with units and a heatmap.

Inputs are held-out synthetic cases (a lesion mammogram and an AD subject), so the printed
predictions can be checked against the generator's ground truth. Results go through the same
client a hospital system would use and land as JSON + PNG / NIfTI files under ``build/demo/``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from devstack.stack import print_endpoints, start
from medxplain_client import Client
from medxplain_client.outputs import write_outputs

DEMO_REQUESTS = {"ddsm": {"explain": ["cam", "gradcam"], "top_k": 5},
                 "adni": {"explain": ["gradcam", "occlusion"], "top_k": 5}}


def _pick(data_dir: Path, index: str) -> tuple[Path, str]:
    """A held-out case with the highest label (a lesion / AD case if the test split has one)."""
    with open(data_dir / index, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = max(rows, key=lambda r: int(r["label"]))
    truth = row.get("label_name") or ("normal", "benign", "malignant")[int(row["label"])]
    return data_dir / row["path"], truth


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
    print()
    print_endpoints(info)
    print("\nstop the services with `make stop`")
