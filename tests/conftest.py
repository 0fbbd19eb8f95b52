"""Shared fixtures: real MinIO, TorchServe and Orthanc (PACS) on random loopback ports, small trained models.

Services are started once per session and always torn down (the fixtures' finalisers run after
failing tests too). Models are trained with the `test` profile on small synthetic sets, so every
run exercises the real generator -> training -> archive -> serving path.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from devstack import iam
from devstack.services import KServeServer, MinioServer, OrthancServer, TorchServeServer
from medxplain_contract.storage import S3Config
from model_store.archive import build_archive
from model_store.synth import mammo, mri
from model_store.train import train

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _interrupt(signum, frame):
    """A CI timeout sends SIGTERM: turn it into KeyboardInterrupt so fixture teardown stops the servers."""
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory) -> MinioServer:
    root = tmp_path_factory.mktemp("minio")
    server = MinioServer(data_dir=root / "data", log_path=root / "minio.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory) -> OrthancServer:
    """Orthanc + DICOMweb plugin, authentication on, a random password (tests/test_pacs.py)."""
    server = OrthancServer(workdir=tmp_path_factory.mktemp("orthanc"))
    yield from _running(server)


# Buckets the per-component users' policies cover in the tests (each test module uses its own).
TEST_RESULTS_BUCKETS = ("ui-test", "iam-results")
TEST_MODELS_BUCKETS = ("iam-models",)


@pytest.fixture(scope="session")
def storage_users(minio_server) -> dict[str, S3Config]:
    """component -> its own storage settings (user + least-privilege policy), as the devstack creates them."""
    users = {c: iam.Credentials.generate(c) for c in iam.COMPONENTS}
    iam.apply(minio_server.admin_config(), users, TEST_RESULTS_BUCKETS, TEST_MODELS_BUCKETS)
    return {c: S3Config(minio_server.endpoint, False, u.access_key, u.secret_key) for c, u in users.items()}


# MEDXAI_TEST_BUNDLES=DIR reuses data and bundles trained once with these same settings (DIR/ddsm-data,
# DIR/ddsm, DIR/ddsm.report.json, the same for adni): for iterating on serving code, not for CI.
# The archives are still built from the checkout each session, so they carry the code under test.
PRETRAINED = Path(os.environ["MEDXAI_TEST_BUNDLES"]) if os.environ.get("MEDXAI_TEST_BUNDLES") else None


def _pretrained_bundle(kind: str) -> tuple[Path, dict]:
    import json

    return PRETRAINED / kind, json.loads((PRETRAINED / f"{kind}.report.json").read_text())


@pytest.fixture(scope="session")
def ddsm_data(tmp_path_factory) -> Path:
    if PRETRAINED:
        return PRETRAINED / "ddsm-data"
    out = tmp_path_factory.mktemp("ddsm-data")
    return mammo.generate_dataset(out, n_cases=30, seed=7, height=700, width=454, progress=False)


@pytest.fixture(scope="session")
def adni_data(tmp_path_factory) -> Path:
    if PRETRAINED:
        return PRETRAINED / "adni-data"
    out = tmp_path_factory.mktemp("adni-data")
    return mri.generate_dataset(out, n_subjects=80, seed=7, resolution_mm=2, progress=False)


@pytest.fixture(scope="session")
def ddsm_bundle(ddsm_data, tmp_path_factory) -> tuple[Path, dict]:
    if PRETRAINED:
        return _pretrained_bundle("ddsm")
    out = tmp_path_factory.mktemp("ddsm-bundle")
    report = train("ddsm", ddsm_data, out, profile="test")
    return out, report


@pytest.fixture(scope="session")
def adni_bundle(adni_data, tmp_path_factory) -> tuple[Path, dict]:
    if PRETRAINED:
        return _pretrained_bundle("adni")
    out = tmp_path_factory.mktemp("adni-bundle")
    report = train("adni", adni_data, out, profile="test")
    return out, report


@pytest.fixture(scope="session")
def model_store(ddsm_bundle, adni_bundle, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    build_archive(ddsm_bundle[0], store)
    build_archive(adni_bundle[0], store)
    return store


@pytest.fixture(scope="session")
def torchserve(model_store, tmp_path_factory) -> TorchServeServer:
    server = TorchServeServer(workdir=tmp_path_factory.mktemp("torchserve"), model_store=model_store,
                              models={"ddsm": "ddsm.mar", "adni": "adni.mar"})
    yield from _running(server)


@pytest.fixture(scope="module")
def torchserve_client(torchserve):
    """A REST client of the suite's TorchServe with its inference key, one per module."""
    from medxplain_client import Client

    with Client(torchserve.inference_url, key_file=torchserve.key_file, timeout=300, retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def kserve(model_store, tmp_path_factory) -> KServeServer:
    """The same archives under KServe's ModelServer (python -m medxplain_kserve), token auth on."""
    server = KServeServer(workdir=tmp_path_factory.mktemp("kserve"), model_store=model_store)
    yield from _running(server)


def _running(server):
    """Start a devstack server for a fixture, stop it afterwards (also when its start failed half-way)."""
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()
