"""The full-mammogram decision: per-class operating points chosen on val, served by the engine,
measured image by image; MIL fine-tuning of the classifier at full-image scale."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.bundle import ModelBundle
from medxplain_models.decision import apply_rule, class_map_logits, decide
from model_store.calibrate import calibrate_ddsm, choose_class_thresholds, predict_with_thresholds
from model_store.image_level import evaluate_images, figures
from model_store.mil import Bags, MILConfig, finetune_classifier, mil_loss

NAMES = ["normal", "benign", "malignant"]
probability = st.floats(0.001, 0.999, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(probability, probability), min_size=1, max_size=20), probability, probability)
def test_vectorised_rule_is_the_served_rule(pairs, tb, tm):
    """Calibration searches with the same rule the engine applies (medxplain_models.decision)."""
    scores = np.array([[0.0, b, m] for b, m in pairs])
    decision = {"thresholds": {"benign": tb, "malignant": tm}}
    served = [apply_rule(list(s), decision, NAMES) for s in scores]
    assert predict_with_thresholds(scores, np.array([tb, tm])).tolist() == served
    for s, label in zip(scores, served):
        out = decide(torch.tensor(s), decision, NAMES)
        assert out["label_index"] == label
        assert (out["lesion_score"] < out["threshold"]) == (label == 0)  # the documented meaning is kept


def test_legacy_single_threshold_still_served():
    out = decide(torch.tensor([1.0, 0.3, 0.6]), {"full_image_threshold": 0.5}, NAMES)
    assert out == {"label_index": 2, "rule": "lesion_score >= threshold", "lesion_score": pytest.approx(0.6),
                   "threshold": 0.5}
    assert decide(torch.tensor([1.0, 0.3, 0.4]), {"full_image_threshold": 0.5}, NAMES)["label_index"] == 0
    assert decide(torch.tensor([1.0, 0.3, 0.4]), {}, NAMES) is None


def test_per_class_thresholds_separate_what_one_threshold_cannot():
    # benign scores live lower than malignant ones: normal benign scores <= 0.25 < benign images 0.35..0.45;
    # normal malignant scores <= 0.65 < malignant images 0.8..0.9
    truth = np.array([0] * 6 + [1] * 3 + [2] * 3)
    scores = np.array([[0, 0.1, 0.5], [0, 0.2, 0.6], [0, 0.25, 0.65], [0, 0.15, 0.55], [0, 0.1, 0.3], [0, 0.2, 0.4],
                       [0, 0.35, 0.2], [0, 0.4, 0.3], [0, 0.45, 0.1], [0, 0.1, 0.8], [0, 0.2, 0.9], [0, 0.3, 0.85]])
    chosen = choose_class_thresholds(scores, truth)
    assert chosen["balanced_accuracy"] == chosen["accuracy"] == 1.0
    tb, tm = chosen["thresholds"]
    assert 0.25 < tb < 0.35 and 0.65 < tm < 0.8  # between the classes it must separate
    single = np.where(scores[:, 1:].max(1) < 0.7, 0, scores[:, 1:].argmax(1) + 1)  # any single threshold errs
    assert (single != truth).any()


def test_window_map_keeps_patch_semantics(ddsm_bundle):
    """On a 227 px patch the window map has one window: the patch classifier's own output."""
    model = ModelBundle.load(ddsm_bundle[0]).model
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        fmap = model.features(x)
        window = class_map_logits(model, fmap, "window")
        np.testing.assert_allclose(window.flatten().numpy(), model(x)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_mil_loss_reads_the_most_suspicious_instance():
    logits = torch.tensor([[5.0, 0.0, 0.0]] * 9 + [[0.0, 4.0, 0.0]], requires_grad=True)  # one benign-looking cell
    normal = mil_loss(logits, 0)
    assert normal > mil_loss(logits, 1) and mil_loss(logits[:9], 0) < 0.05
    normal.backward()
    moved = logits.grad.abs().sum(dim=1)
    assert moved[9] > 0 and moved[:9].sum() < 1e-3 * moved[9]  # gradient only where the max is


def test_mil_refit_fixes_a_hard_negative():
    """A bag problem the patch loss alone gets wrong at image scale: normal images hold one cell that
    looks like a lesion to the initial classifier. Refitting on the bags' maxima must fix it."""
    gen = torch.Generator().manual_seed(0)
    units = 8
    fc = torch.nn.Linear(units, 3)
    with torch.no_grad():  # initial classifier: unit 0 -> benign, unit 1 -> malignant
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
        fc.weight[1, 0] = fc.weight[2, 1] = 4.0
        fc.weight[1, 2] = 4.0  # the hard negative (unit 2) also reads as benign
    bags, labels = [], []
    for label in [0] * 20 + [1] * 10 + [2] * 10:
        x = torch.rand(30, units, generator=gen) * 0.2
        if label == 0:
            x[0, 2] = 1.0  # hard-negative cell
        else:
            x[0, label - 1] = 1.0
        bags.append(x.half()), labels.append(label)
    patch_x = torch.stack([torch.eye(units)[0], torch.eye(units)[1], torch.zeros(units)])
    patch_y = np.array([1, 2, 0])  # lesion patches and a plain normal patch: unit 2 never appears in them
    before = [apply_rule(torch.softmax(fc(b.float()), 1).amax(0).tolist(), {"full_image_threshold": 0.5}, NAMES)
              for b in bags]
    summary = finetune_classifier(fc, Bags(bags, np.array(labels)), patch_x, patch_y,
                                  MILConfig(steps=300, lr=0.05), progress=False)
    with torch.no_grad():
        after = [apply_rule(torch.softmax(fc(b.float()), 1).amax(0).tolist(), {"full_image_threshold": 0.5}, NAMES)
                 for b in bags]
        patches = fc(patch_x).argmax(1).numpy()
    assert np.mean(np.array(before) == labels) <= 0.5
    assert np.mean(np.array(after) == labels) >= 0.9
    assert patches.tolist() == patch_y.tolist()  # a patch still gives its class
    assert summary["trained"].startswith("fc only")


def test_figures_count_every_image():
    truth = np.array([0, 0, 1, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0])
    scores = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    f = figures(truth, predicted, scores, NAMES)
    assert np.sum(f["confusion_matrix"]) == 5 and f["accuracy"] == pytest.approx(0.6)
    assert f["recall"] == {"normal": 0.5, "benign": 1.0, "malignant": 0.5}
    assert f["roc_auc"]["malignant"] == 1.0 and 0 < f["macro_roc_auc"] <= 1


# --- on the trained test-profile model ------------------------------------------------------------

def _split_counts(data_dir, split):
    with open(data_dir / "images.csv", newline="") as f:
        return np.bincount([int(r["label"]) for r in csv.DictReader(f) if r["split"] == split], minlength=3)


def test_training_calibrates_on_val_and_reports_image_level(ddsm_bundle, ddsm_data):
    bundle_dir, report = ddsm_bundle
    decision = ModelBundle.load(bundle_dir).decision
    assert decision["rule"] == "per_class_thresholds" and decision["split"] == "val"
    assert decision["images"] == _split_counts(ddsm_data, "val").sum()
    assert set(decision["thresholds"]) == {"benign", "malignant"}
    assert report["mil"]["trained"].startswith("fc only") and sum(report["mil"]["images"]) > 0
    for doc in (json.loads((bundle_dir / "metrics.json").read_text()),
                json.loads((bundle_dir / "model_card.json").read_text())["metrics"]):
        served = doc["image_level"]["served"]
        assert doc["image_level"]["split"] == "test"
        assert np.array(served["confusion_matrix"]).sum(axis=1).tolist() == _split_counts(ddsm_data, "test").tolist()
        assert set(served["recall"]) == set(NAMES) and 0 <= served["macro_roc_auc"] <= 1


def test_thresholds_depend_on_val_only(ddsm_bundle, ddsm_data, tmp_path):
    """Calibrating on a copy whose test images are destroyed gives the same operating point."""
    data = tmp_path / "data"
    shutil.copytree(ddsm_data, data, ignore=shutil.ignore_patterns("*.npz"))
    with open(data / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["split"] != "val":
            (data / r["path"]).write_bytes(b"not an image")
    bundle = ModelBundle.load(ddsm_bundle[0])
    saved = bundle.decision
    again = calibrate_ddsm(bundle, data, "val", progress=False)
    assert again["thresholds"] == pytest.approx(saved["thresholds"])


def test_served_decision_is_evaluated_and_beats_the_uncalibrated_rule(ddsm_bundle, ddsm_data):
    bundle_dir, _ = ddsm_bundle
    report = evaluate_images(bundle_dir, ddsm_data, "test", progress=False)
    served, raw = report["served"], report["uncalibrated"]
    # The uncalibrated argmax at the most suspicious position calls (nearly) every normal view abnormal;
    # the calibrated rule must not: its balanced accuracy is higher on held-out images.
    assert np.mean(list(served["recall"].values())) > np.mean(list(raw["recall"].values()))
    assert served["macro_roc_auc"] > 0.5
    # Same labels as a request to the engine gets.
    with open(ddsm_data / "images.csv", newline="") as f:
        first = next(r for r in csv.DictReader(f) if r["split"] == "test")
    (online,) = Engine.from_model_dir(bundle_dir).run([EngineRequest((ddsm_data / first["path"]).read_bytes(), {})])
    single = evaluate_images(bundle_dir, ddsm_data, "test", limit=1, progress=False)["served"]
    assert single["confusion_matrix"][int(first["label"])][online["prediction"]["label_index"]] == 1
    assert online["prediction"]["decision"]["rule"] == "per_class_thresholds"
    assert set(online["prediction"]["decision"]["scores"]) == {"benign", "malignant"}


def test_evaluate_images_cli(ddsm_bundle, ddsm_data, tmp_path):
    run = [sys.executable, "-m", "model_store", "evaluate-images"]
    assert "confusion" in subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    bundle = tmp_path / "bundle"
    shutil.copytree(ddsm_bundle[0], bundle)
    out = tmp_path / "report.json"
    done = subprocess.run([*run, "--bundle", str(bundle), "--data", str(ddsm_data), "--limit", "2", "--out", str(out)],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "macro ROC AUC" in done.stdout
    assert json.loads(out.read_text())["images"] == 2
    assert json.loads((bundle / "metrics.json").read_text())["image_level"]["images"] == 2
    with open(ddsm_data / "images.csv", newline="") as f:
        first = [r["split"] for r in csv.DictReader(f)][:24]
    assert len(set(first)) > 1  # so 'all' has more than one split to take
    every = subprocess.run([*run, "--bundle", str(bundle), "--data", str(ddsm_data), "--split", "all", "--limit", "24",
                            "--no-record", "--out", str(out)], check=False, capture_output=True, text=True)
    assert every.returncode == 0, every.stderr[-2000:]
    assert json.loads(out.read_text())["images"] == 24 and json.loads(out.read_text())["split"] == "all"
    bad = subprocess.run([*run, "--bundle", str(bundle), "--data", str(ddsm_data), "--split", "nope"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "no images" in bad.stderr
