"""The seed's own 1 mm geometry (193x229x193, flatten 5120) goes through the engine end to end.

The demo model runs at 2 mm to train in minutes; users bring seed checkpoints at 1 mm, so the
engine must serve that grid too: input on the grid, input on another grid (resampled), maps with
the right shape and affine. Weights are random: this checks plumbing, not accuracy.
"""

from __future__ import annotations

import base64
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.bundle import ModelBundle, MRIPreprocessing, build_model
from model_store.synth.mri import template_grid


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data.astype(np.float32), affine).to_bytes(), compresslevel=1)


def _decode(heatmap: dict) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(heatmap["data"])))


@pytest.fixture(scope="module")
def seed_engine(tmp_path_factory) -> tuple[Engine, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    template, mask, affine = template_grid(1)
    model = build_model("adni", {"input_shape": list(template.shape), "num_classes": 2, "dropout": 0.0, "dropout2": 0.0})
    assert model.dense_1.in_features == 5120  # the seed's flatten size
    prep = MRIPreprocessing(mean=template.astype(np.float32), std=np.full(template.shape, 50.0, np.float32),
                            brain_mask=mask > 0.5, affine=affine)
    bundle = ModelBundle("adni", "adni-seed-grid", "0.0", ["CN", "AD"], model, preprocessing=prep)
    directory = bundle.save(tmp_path_factory.mktemp("seed-bundle"))
    return Engine.from_model_dir(directory), template, affine


def test_seed_grid_volume_is_used_as_is(seed_engine):
    engine, template, affine = seed_engine
    rng = np.random.default_rng(0)
    volume = template + rng.normal(0, 20, template.shape)
    (result,) = engine.run([EngineRequest(_nifti_bytes(volume, affine), {"explain": "gradcam,sensitivity", "top_k": 4})])
    assert isinstance(result, dict), result
    assert result["input"]["shape"] == [193, 229, 193] and result["input"]["resampled"] is False
    assert abs(sum(result["prediction"]["probabilities"].values()) - 1) < 1e-5
    assert len(result["units"]) == 4
    for method in ("gradcam", "sensitivity"):
        img = _decode(result["heatmaps"][method])
        assert img.shape == (193, 229, 193)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        assert np.isfinite(np.asarray(img.dataobj)).all()


def test_other_grid_is_resampled_and_maps_return_on_it(seed_engine):
    engine, template, affine = seed_engine
    coarse = template[::2, ::2, ::2]
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] *= 2
    (result,) = engine.run([EngineRequest(_nifti_bytes(coarse, coarse_affine), {"explain": "gradcam"})])
    assert isinstance(result, dict), result
    assert result["input"]["resampled"] is True and any("resampled" in w for w in result["warnings"])
    img = _decode(result["heatmaps"]["gradcam"])
    assert img.shape == coarse.shape
    np.testing.assert_allclose(img.affine, coarse_affine, atol=1e-5)


def test_seed_grid_response_fits_the_response_limit(seed_engine):
    """A full-resolution 3D heatmap must fit TorchServe's max_response_size (64 MiB, docs/api.md)."""
    engine, template, affine = seed_engine
    (result,) = engine.run([EngineRequest(_nifti_bytes(template, affine), {"explain": "gradcam,sensitivity"})])
    assert len(json.dumps(result).encode()) < 64 * 1024 * 1024
