"""The demo's last step: start the stack and ask each served model for one prediction.

Inputs are held-out synthetic cases (a malignant mammogram patch region and an AD subject), so the
printed predictions can be checked against the generator's ground truth.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import requests

from devstack.stack import print_endpoints, start


def _pick_ddsm_image(data_dir: Path) -> tuple[Path, str]:
    with open(data_dir / "images.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = max(rows, key=lambda r: int(r["label"]))  # a lesion image if the test split has one
    return data_dir / row["path"], f"case {row['case_id']} {row['side']} {row['view']}, true label {row['label']}"


def _pick_adni_volume(data_dir: Path) -> tuple[Path, str]:
    with open(data_dir / "subjects.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = max(rows, key=lambda r: int(r["label"]))
    return data_dir / row["path"], f"subject {row['subject_id']}, true label {row['label_name']}"


def run_demo(build: Path) -> None:
    info = start(build / "stack", build / "model-store")
    ts = info["torchserve"]
    keys = json.loads(Path(ts["token_file"]).read_text())
    headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
    out_dir = build / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    for model, (path, truth) in {"ddsm": _pick_ddsm_image(build / "data" / "ddsm"),
                                 "adni": _pick_adni_volume(build / "data" / "adni")}.items():
        response = requests.post(f"{ts['inference']}/predictions/{model}", data=path.read_bytes(),
                                 headers=headers, timeout=300)
        response.raise_for_status()
        result = response.json()
        (out_dir / f"{model}_prediction.json").write_text(json.dumps(result, indent=2) + "\n")
        pred = result["prediction"]
        probs = ", ".join(f"{k} {v:.3f}" for k, v in pred["probabilities"].items())
        print(f"\n{model}: {path.name} ({truth})\n  predicted {pred['label']} ({probs})"
              f"\n  model {result['model']['name']} v{result['model']['version']}, "
              f"archive digest {result['model']['archive_digest'][:16]}...  -> {out_dir / (model + '_prediction.json')}")
    print()
    print_endpoints(info)
    print("\nstop the services with `make stop`")
