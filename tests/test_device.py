"""Where the engine computes (medxplain_engine/device.py) and the forward-only mixed precision (``amp``).

CPU tests: device names are resolved or refused with a clear message; an engine built with
``device="cpu"`` explicitly gives the default engine's results; ``amp`` is reported in
``model.precision`` (validated by the schema) and never touches explanations; TorchServe's context
(the real ``ts.context.Context``) and ``python -m batch run --device`` are wired to it. Models have
random weights: nothing here rests on training. With CUDA present, GPU results are compared with CPU
ones within tolerance (skipped here).
"""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch
from jsonschema import ValidationError
from ts.context import Context

from batch.cli import build_parser, main
from batch.runner import compute_fingerprint
from handlers.torchserve_adapter import EngineHandler, assigned_device
from medxplain_contract.schema import validate_response
from medxplain_engine.device import DeviceError, precision_label, resolve_device
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.adni import CLASS_NAMES as ADNI_CLASSES
from medxplain_models.adni import ADNIConfig, ClassificationModel3D
from medxplain_models.bundle import ModelBundle, MRIPreprocessing
from medxplain_models.ddsm import CLASS_NAMES as DDSM_CLASSES
from medxplain_models.ddsm import DDSMConfig, DDSMResNet
from tests.inputs import nifti_bytes, patch_png, png_bytes

NO_CUDA = not torch.cuda.is_available()
GRID = (97, 115, 97)  # the 2 mm template grid
AFFINE = np.array([[2.0, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def ddsm_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = DDSMResNet(DDSMConfig(depth=18))
    bundle = ModelBundle(kind="ddsm", name="ddsm", version="t", class_names=list(DDSM_CLASSES), model=model)
    return bundle.save(tmp_path_factory.mktemp("ddsm-random"))


@pytest.fixture(scope="module")
def adni_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ClassificationModel3D(ADNIConfig(input_shape=GRID))
    grid = np.indices(GRID, dtype=np.float32)
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, (48, 57, 48), (40, 48, 36))) <= 1
    prep = MRIPreprocessing(mean=np.zeros(GRID, np.float32), std=np.ones(GRID, np.float32), brain_mask=mask,
                            affine=AFFINE)
    bundle = ModelBundle(kind="adni", name="adni", version="t", class_names=list(ADNI_CLASSES), model=model,
                         preprocessing=prep)
    return bundle.save(tmp_path_factory.mktemp("adni-random"))


def _mammogram(seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes((rng.random((400, 300)) * 65535).astype(np.uint16))


def _volume(seed: int = 2) -> bytes:
    return nifti_bytes(np.random.default_rng(seed).normal(size=GRID).astype(np.float32), AFFINE)


def _without_timing(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timing_ms"}


# --- device names ---------------------------------------------------------------------------------

def test_device_names_resolve():
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cpu") if NO_CUDA else torch.device("cuda", 0))


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "cuda0", "cpu;rm -rf /", "", "mps"])
def test_bad_device_names_are_refused_without_echo(name):
    with pytest.raises(DeviceError) as err:
        resolve_device(name)
    message = str(err.value)
    assert "auto|cpu|cuda|cuda:N" in message and message.isascii()
    assert not name or name not in message


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_device_is_a_clear_error(name):
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        resolve_device(name)


def test_precision_labels():
    assert precision_label(torch.device("cpu"), False) == precision_label(torch.device("cuda"), False) == "fp32"
    assert precision_label(torch.device("cpu"), True) == "bf16-autocast"
    assert precision_label(torch.device("cuda"), True) == "fp16-autocast"


# --- the engine on the CPU ------------------------------------------------------------------------

DDSM_PARAMS = {"explain": "cam,gradcam,saliency,occlusion", "occlusion_size": 64, "occlusion_stride": 64, "top_k": 4, "unit_maps": True,
               "encoding": "float16"}
FULL_PARAMS = {"explain": "cam,gradcam", "top_k": 4}  # full mammograms: the cheap methods (occlusion is patch-tested)
ADNI_PARAMS = {"explain": "gradcam,occlusion", "occlusion_stride": 40, "top_k": 3}


def test_explicit_cpu_equals_the_default(ddsm_dir, adni_dir):
    for directory, payloads, params in ((ddsm_dir, [patch_png(3)], DDSM_PARAMS), (ddsm_dir, [_mammogram()], FULL_PARAMS),
                                        (adni_dir, [_volume()], ADNI_PARAMS)):
        default = Engine.from_model_dir(directory)
        explicit = Engine.from_model_dir(directory, device="cpu")
        as_object = Engine.from_model_dir(directory, device=torch.device("cpu"))
        assert default.device == explicit.device == as_object.device == torch.device("cpu")
        requests = [EngineRequest(p, params) for p in payloads]
        ours = default.run(requests)
        assert all(isinstance(r, dict) and r["model"]["precision"] == "fp32" for r in ours)
        for other in (explicit, as_object):
            theirs = other.run(requests)
            assert [_without_timing(r) for r in theirs] == [_without_timing(r) for r in ours]
        assert len(ours[0]["heatmaps"]) == len(params["explain"].split(","))  # not vacuous
        validate_response(ours[0])


def test_a_bad_device_is_refused_before_loading(ddsm_dir):
    with pytest.raises(DeviceError):
        Engine.from_model_dir(ddsm_dir, device="tpu")


def test_amp_is_reported_and_leaves_explanations_in_fp32(ddsm_dir):
    fp32 = Engine.from_model_dir(ddsm_dir)
    amp = Engine.from_model_dir(ddsm_dir, amp=True)
    plain, explained = EngineRequest(patch_png(5), {"top_k": 3}), EngineRequest(patch_png(6), DDSM_PARAMS)
    fast, slow = amp.run([plain, explained])  # one batch, two precisions
    assert fast["model"]["precision"] == "bf16-autocast" and slow["model"]["precision"] == "fp32"
    validate_response(fast)
    assert _without_timing(slow) == _without_timing(fp32.run([explained])[0])  # explanations: bit for bit fp32
    reference = fp32.run([plain])[0]
    assert reference["model"]["precision"] == "fp32"
    for name, p in reference["prediction"]["probabilities"].items():
        assert abs(fast["prediction"]["probabilities"][name] - p) < 0.1  # bf16 keeps ~3 significant digits
    assert [u["unit"] for u in fast["units"]] and len(fast["units"]) == 3
    full = amp.run([EngineRequest(_mammogram(), {"top_k": 2})])[0]
    assert full["model"]["precision"] == "bf16-autocast" and validate_response(full)


def test_schema_refuses_an_unknown_precision(ddsm_dir):
    body = Engine.from_model_dir(ddsm_dir).run([EngineRequest(patch_png(7), {"top_k": 1})])[0]
    broken = copy.deepcopy(body)
    broken["model"]["precision"] = "fp64"
    with pytest.raises(ValidationError):
        validate_response(broken)


# --- serving and batch ----------------------------------------------------------------------------

def test_torchserve_context_gives_the_device_and_amp(ddsm_dir):
    """TorchServe's own Context: gpu_id 0 without CUDA is the CPU (as its BaseHandler decides), amp from the yaml."""
    assert assigned_device({"gpu_id": None}) == "cpu"
    assert assigned_device({"gpu_id": 0}) == ("cpu" if NO_CUDA else "cuda:0")
    handler = EngineHandler()
    threads = torch.get_num_threads()  # initialize sets it process-wide: keep this process's (other tests compare maps)
    context = Context("ddsm", str(ddsm_dir), {}, 1, 0, "0.12.0",
                      model_yaml_config={"batchSize": 1, "handler": {"amp": True, "torch_num_threads": threads}})
    handler.initialize(context)
    assert torch.get_num_threads() == threads
    assert handler.engine.device == resolve_device(assigned_device({"gpu_id": 0})) and handler.engine.amp
    (body,) = handler.handle([{"body": patch_png(8)}], context)
    assert json.loads(body)["model"]["precision"] == precision_label(handler.engine.device, True)
    bad = Context("ddsm", str(ddsm_dir), {}, 1, None, "0.12.0", model_yaml_config={"handler": {"amp": "maybe", "torch_num_threads": threads}})
    with pytest.raises(DeviceError, match="handler.amp"):
        EngineHandler().initialize(bad)
    assert torch.get_num_threads() == threads


def test_batch_help_names_device_and_amp(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--device" in text and "auto|cpu|cuda|cuda:N" in text and "--amp" in text


@pytest.mark.parametrize("device", ["gpu", "cuda:x"] + (["cuda", "cuda:0"] if NO_CUDA else []))
def test_batch_refuses_an_unusable_device(device, capsys, tmp_path):
    args = ["run", "--model", "ddsm", "--archive", str(tmp_path / "none.mar"), "--input", str(tmp_path),
            "--output", "s3://bucket/run", "--device", device]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and ("unknown device" in err or "no CUDA device" in err)


def test_fingerprint_names_device_type_and_amp_only_off_the_default():
    assert compute_fingerprint(torch.device("cpu"), False) == {}  # CPU fp32 runs keep their old fingerprint
    assert compute_fingerprint(torch.device("cpu"), True) == {"amp": True}
    assert compute_fingerprint(torch.device("cuda", 1), False) == compute_fingerprint(torch.device("cuda", 0), False)
    assert compute_fingerprint(torch.device("cuda", 0), False) == {"device": "cuda"}


# --- CUDA (skipped without a GPU) -----------------------------------------------------------------

@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device; `make bench-gpu` runs the full comparison there")
def test_cuda_agrees_with_cpu(ddsm_dir, adni_dir):
    from scipy.stats import spearmanr

    from medxplain_contract.encodings import decode_map

    for directory, payload, params in ((ddsm_dir, patch_png(3), DDSM_PARAMS), (adni_dir, _volume(), ADNI_PARAMS)):
        cpu = Engine.from_model_dir(directory).run([EngineRequest(payload, params)])[0]
        gpu = Engine.from_model_dir(directory, device="cuda").run([EngineRequest(payload, params)])[0]
        for name, p in cpu["prediction"]["probabilities"].items():
            assert abs(gpu["prediction"]["probabilities"][name] - p) < 1e-3
        for method in cpu["heatmaps"]:
            a, b = decode_map(cpu["heatmaps"][method]), decode_map(gpu["heatmaps"][method])
            assert spearmanr(a.ravel(), b.ravel()).statistic > 0.99, method


def test_gpu_release_model_config(tmp_path):
    """`python -m model_store archive --device-type gpu`: the shipped config with deviceType gpu and deviceIds [0]."""
    import yaml

    from model_store.archive import ArchiveError, model_config

    for kind in ("ddsm", "adni"):
        shipped = model_config(kind, "cpu", tmp_path)
        cpu, gpu = yaml.safe_load(shipped.read_text()), yaml.safe_load(model_config(kind, "gpu", tmp_path).read_text())
        assert cpu["deviceType"] == "cpu" and "deviceIds" not in cpu and cpu["handler"]["amp"] is False
        assert gpu["deviceType"] == "gpu" and gpu["deviceIds"] == [0]
        assert {k: v for k, v in gpu.items() if k not in ("deviceType", "deviceIds")} == \
            {k: v for k, v in cpu.items() if k != "deviceType"}
    with pytest.raises(ArchiveError):
        model_config("ddsm", "tpu", tmp_path)


def test_bench_gpu_without_cuda_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "devstack.bench_gpu", "--help"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and "--map-tol" in done.stdout
    if not NO_CUDA:
        pytest.skip("this machine has CUDA: the bench would run")
    done = subprocess.run([sys.executable, "-m", "devstack.bench_gpu", "--build", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA device" in done.stderr


def test_bench_gpu_repacks_an_archive_for_gpu_workers(ddsm_dir, tmp_path):
    """The bench serves a copy of the archive whose model-config.yaml says deviceType gpu, with a valid digest."""
    import yaml

    from devstack.bench_gpu import gpu_archive
    from medxplain_contract.integrity import verify_archive
    from model_store.archive import build_archive

    mar = build_archive(ddsm_dir, tmp_path / "cpu")
    repacked = gpu_archive(mar, tmp_path / "gpu")
    verify_archive(repacked)  # raises unless its published sha256 matches
    with zipfile.ZipFile(mar) as a, zipfile.ZipFile(repacked) as b:
        config = json.loads(a.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]
        assert yaml.safe_load(a.read(config))["deviceType"] == "cpu"
        assert yaml.safe_load(b.read(config))["deviceType"] == "gpu"
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert all(a.read(n) == b.read(n) for n in a.namelist() if n != config)
