"""The test-profile training runs end to end, learns, and writes a complete bundle."""

from __future__ import annotations

import json

import torch

from model_store.bundle import ModelBundle, sha256_file


def test_ddsm_learns_on_held_out_patches(ddsm_bundle):
    bundle_dir, report = ddsm_bundle
    auc = report["test"]["roc_auc"]
    assert report["test"]["macro_roc_auc"] > 0.75, auc
    assert auc["normal"] > 0.8, auc  # lesion vs tissue is the easy part; it must be learnt even in the small run
    saved = json.loads((bundle_dir / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] and len(saved["test"]["confusion_matrix"]) == 3


def test_adni_learns_on_held_out_subjects(adni_bundle):
    _, report = adni_bundle
    assert report["test"]["macro_roc_auc"] > 0.75, report["test"]


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
