"""The DDSM engine's CPU speed-ups (model_store/configs/ddsm.yaml ``handler:``) keep eager's results.

A small random DDSM ResNet-18 (BatchNorm statistics from the image, so activations are O(1)) in a
bundle, loaded twice: eager, and with the served speed-ups (plus the fused forward, which is off in
the shipped config but offered). Same prediction, class scores and maps within float32 rounding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medxplain_contract.encodings import decode_2d
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.bundle import ModelBundle
from medxplain_models.ddsm import CLASS_NAMES, DDSMConfig, DDSMResNet, SpeedSettings
from medxplain_models.preprocess import ddsm_normalise

ROOT = Path(__file__).resolve().parents[1]
SERVED = yaml.safe_load((ROOT / "model_store/configs/ddsm.yaml").read_text())["handler"]


def _png(shape: tuple[int, int]) -> bytes:
    rows, cols = np.indices(shape)
    blob = np.exp(-((rows - shape[0] * 0.4) ** 2 + (cols - shape[1] * 0.6) ** 2) / (2 * (min(shape) / 8) ** 2))
    image = (65535 * (0.2 + 0.6 * blob + 0.1 * np.random.default_rng(0).random(shape))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DDSMResNet(DDSMConfig(depth=18))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(ddsm_normalise(torch.rand(2, 227, 227)))
    bundle = ModelBundle(kind="ddsm", name="speed", version="t", class_names=list(CLASS_NAMES), model=model.eval())
    return bundle.save(tmp_path_factory.mktemp("speed") / "bundle")


def test_served_config_turns_on_known_speedups_only():
    keys = {"channels_last", "fused_forward", "warm_up"}
    assert keys <= set(SERVED) and SpeedSettings.from_dict(SERVED).channels_last
    assert SpeedSettings.from_dict({}) == SpeedSettings()  # absent keys: eager


@pytest.mark.parametrize("settings", [SERVED, {"channels_last": True, "fused_forward": True}],
                         ids=["served", "fused"])
def test_speedups_keep_eager_results(bundle_dir, settings):
    eager, fast = Engine.from_model_dir(bundle_dir), Engine.from_model_dir(bundle_dir)
    applied = fast.apply_speed_settings(settings)
    assert applied["channels_last"] and fast.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for payload in (_png((227, 227)), _png((301, 233))):  # a patch, and a small non-square full image
        request = {"explain": "cam,gradcam", "top_k": 4, "encoding": "float16"}
        got, ref = (e.run([EngineRequest(payload, request)])[0] for e in (fast, eager))
        assert got["prediction"]["label"] == ref["prediction"]["label"]
        for name, p in ref["prediction"]["probabilities"].items():
            assert got["prediction"]["probabilities"][name] == pytest.approx(p, abs=1e-5)
        for name, s in ref["input"].get("class_scores", {}).items():
            assert got["input"]["class_scores"][name] == pytest.approx(s, abs=1e-5)
        assert [u["unit"] for u in got["units"]] == [u["unit"] for u in ref["units"]]
        for method in ("cam", "gradcam"):  # float16 maps: equal up to float16 rounding of the largest values
            a, b = (decode_2d(r["heatmaps"][method]).astype(np.float32) for r in (got, ref))
            assert np.abs(b).max() > 0, method
            assert np.abs(a - b).max() <= 2e-3 * np.abs(b).max(), method


def test_eager_and_fast_differ_when_the_weights_do(bundle_dir):
    """The comparison above can fail: a perturbed weight changes the probabilities beyond its tolerance."""
    eager, fast = Engine.from_model_dir(bundle_dir), Engine.from_model_dir(bundle_dir)
    fast.apply_speed_settings(SERVED)
    with torch.no_grad():
        fast.model.fc.bias.add_(torch.tensor([0.5, -0.5, 0.0]))
    payload = _png((227, 227))
    got, ref = (e.run([EngineRequest(payload, {})])[0]["prediction"]["probabilities"] for e in (fast, eager))
    assert max(abs(got[n] - ref[n]) for n in ref) > 1e-3
