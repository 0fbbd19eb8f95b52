"""The test-profile training runs end to end, proves it learned on the validation split, and writes a complete bundle.

Figures differ between CPUs (kernels sum in another order), so nothing here rests on exact values:
training itself refuses to finish below the validation bar; the held-out test split must then be
clearly above chance, with a margin of 0.1 below the bar for the sampling noise of a small split.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medxplain_models.bundle import ModelBundle, sha256_file
from model_store.metrics import classification_report
from model_store.train import PROFILES, BarNotMet, TrainConfig, _fit_to_bar


def _check_validation_and_runtime(report: dict, kind: str) -> None:
    bar = dict(PROFILES["test"][kind].val_bar)
    val = report["validation"]
    assert val["bar"]["met"] and val["bar"]["min_roc_auc"] == bar, val
    for metric, low in bar.items():
        assert (val["macro_roc_auc"] if metric == "macro" else val["roc_auc"][metric]) >= low, val
    assert val["bar"]["extra_epochs"] <= PROFILES["test"][kind].extra_epochs
    assert len(report["loss_history"]) == val["bar"]["epochs"] + val["bar"]["extra_epochs"]
    runtime = report["runtime"]
    assert runtime["threads"] == report["config"]["threads"] == report["torch_threads"]
    assert runtime["deterministic_algorithms"] is True
    assert runtime["torch"]["version"] == torch.__version__ and runtime["torch"]["onednn"]
    assert runtime["cpu"]["model"] and isinstance(runtime["cpu"]["isa_flags"], list)


def test_ddsm_learns_on_held_out_patches(ddsm_bundle):
    bundle_dir, report = ddsm_bundle
    _check_validation_and_runtime(report, "ddsm")
    auc = report["test"]["roc_auc"]
    bar = dict(PROFILES["test"]["ddsm"].val_bar)
    assert report["test"]["macro_roc_auc"] > bar["macro"] - 0.1, auc
    assert auc["normal"] > bar["normal"] - 0.1, auc  # lesion vs tissue: the part that must be learnt
    saved = json.loads((bundle_dir / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] and len(saved["test"]["confusion_matrix"]) == 3
    assert saved["runtime"] == report["runtime"]
    assert ModelBundle.load(bundle_dir).card["training"]["runtime"] == report["runtime"]


def test_adni_learns_on_held_out_subjects(adni_bundle):
    _, report = adni_bundle
    _check_validation_and_runtime(report, "adni")
    assert report["test"]["macro_roc_auc"] > dict(PROFILES["test"]["adni"].val_bar)["macro"] - 0.1, report["test"]


def _toy(seed: int, learnable: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs (learnable) or the same points with random labels (not)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 256)
    x = rng.normal(size=(256, 4)) + (2.0 * y[:, None] if learnable else 0.0)
    if not learnable:
        y = rng.integers(0, 2, 256)
    x_t, y_t = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return x_t[:192], y_t[:192], x_t[192:], y_t[192:]


def _train_toy(learnable: bool, cfg: TrainConfig):
    torch.manual_seed(0)
    x, y, vx, vy = _toy(0, learnable)
    model = nn.Linear(4, 2)

    def batches(epoch):
        order = torch.from_numpy(np.random.default_rng((0, epoch)).permutation(len(y)))
        return ((x[i], y[i]) for i in order.split(cfg.batch_size))

    def validate():
        with torch.no_grad():
            return classification_report(vy.numpy(), torch.softmax(model(vx), 1).numpy(), ["a", "b"])

    return _fit_to_bar(model, batches, len(y) // cfg.batch_size, cfg, "toy", validate)


def test_validation_bar_continues_until_met():
    # One epoch at this rate leaves the blobs' AUC near 0.93; a few extra epochs reach 0.95.
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01, val_bar=(("macro", 0.95),), extra_epochs=20)
    history, val = _train_toy(True, cfg)
    assert val["bar"]["met"] and val["macro_roc_auc"] >= 0.95 and val["bar"]["extra_epochs"] >= 1
    assert len(history) == 1 + val["bar"]["extra_epochs"]


def test_validation_bar_fails_loudly_with_the_figures():
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, val_bar=(("macro", 0.9), ("b", 0.95)), extra_epochs=2)
    with pytest.raises(BarNotMet, match=r"validation ROC AUC below the bar after 2 \+ 2 epochs \(macro 0\.\d{3} < "
                                        r"0\.90; b 0\.\d{3} < 0\.95; macro 0\.\d{3}, per class: a 0\.\d{3}, "
                                        r"b 0\.\d{3}; accuracy"):
        _train_toy(False, cfg)


def test_bundle_round_trip(adni_bundle):
    bundle_dir, _ = adni_bundle
    bundle = ModelBundle.load(bundle_dir)
    assert bundle.card["weights_sha256"] == sha256_file(bundle_dir / "weights.pt")
    prep = bundle.preprocessing
    assert prep is not None and prep.mean.shape == prep.std.shape == prep.brain_mask.shape
    assert bundle.atlas is not None and bundle.atlas.labels.shape == prep.shape
    # Normalised training-mean input is zero everywhere: the occlusion fill value means "average".
    assert float(abs(prep.normalise(prep.mean)).max()) == 0.0
    x = torch.from_numpy(prep.normalise(prep.mean))[None, None]
    with torch.no_grad():
        assert bundle.model(x).shape == (1, 2)
