"""The five container images (serve, its KServe-runtime stage kserve, batch, ui, minio), built with buildah and started with their own ENTRYPOINT, CMD and USER.

Builds are slow when cold (the serve and batch images carry torch): the module (re)builds all five
on the local base stand-ins (devstack/images.py; `make images` builds them ahead), and buildah
reuses every unchanged layer, so a cached rebuild only re-copies the project's code. Set MEDXAI_IMAGES_TORCH_INDEX to the torch index this machine reaches (PyPI here).
The serve and batch checks use the session's trained archives and ddsm set, or, to skip training,
MEDXAI_IMAGES_MODEL_STORE (a folder with ddsm.mar + .sha256) and MEDXAI_IMAGES_DDSM_DATA.
It skips only where buildah is not installable (not root, no apt-get); MEDXAI_SKIP_IMAGES=1 skips
it on purpose (.ci/run sets it when the time budget does not allow the image tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack import images
from devstack.services import MinioServer


def _ensure_buildah() -> str | None:
    """Install buildah + debootstrap like `make check-buildah`; the reason when that is impossible."""
    if shutil.which("buildah") and shutil.which("debootstrap"):
        return images.buildah_available()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "buildah/debootstrap missing and not installable here (needs root and apt-get)"
    # Installable but failing is a failure, not a skip.
    subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                   "--no-install-recommends buildah debootstrap", shell=True, check=True)
    return images.buildah_available()


pytestmark = pytest.mark.skipif(os.environ.get("MEDXAI_SKIP_IMAGES") == "1",
                                reason="MEDXAI_SKIP_IMAGES=1 (.ci/run: image tests outside this run's time budget)")


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    reason = _ensure_buildah()
    if reason:
        pytest.skip(reason)
    images.build_base_images()
    index = os.environ.get("MEDXAI_IMAGES_TORCH_INDEX") or None
    for name in images.IMAGES:  # always: buildah reuses every unchanged layer, so this picks up code changes
        images.build_image(name, index)
    return {name: images.image_ref(name) for name in images.IMAGES}


@pytest.fixture(scope="module")
def image_store(request, tmp_path_factory) -> Path:
    """The suite's archives (trained in this session), or MEDXAI_IMAGES_MODEL_STORE's (e.g. build/model-store),
    copied where the images' user (uid 10001) can read them: pytest's folders are root-only (0700) and a
    bind mount keeps the host's permissions, so the mounted store would be unreadable inside."""
    env = os.environ.get("MEDXAI_IMAGES_MODEL_STORE")
    source = Path(env) if env else request.getfixturevalue("model_store")
    store = tmp_path_factory.mktemp("image-model-store")
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, store / path.name)
            (store / path.name).chmod(0o644)
    store.chmod(0o755)
    return store


@pytest.fixture(scope="module")
def image_data(request) -> Path:
    """The suite's synthetic ddsm set, or MEDXAI_IMAGES_DDSM_DATA's (e.g. build/data/ddsm)."""
    env = os.environ.get("MEDXAI_IMAGES_DDSM_DATA")
    return Path(env) if env else request.getfixturevalue("ddsm_data")


def test_images_run_as_non_root_with_their_entrypoints(built):
    for name, ref in built.items():
        config = images.image_config(ref)
        assert config.get("User") == "10001:10001", name
        assert config.get("Entrypoint"), name
        assert images.image_size(ref) > 50e6, name


def test_minio_image_bucket_round_trip(built, tmp_path):
    result = images.check_minio(tmp_path)
    assert result["healthcheck"] == 0 and result["roundtrip_bytes"] == 4096


def test_serve_image_answers_an_authenticated_prediction(built, image_store, image_data, tmp_path):
    import csv
    with open(image_data / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    result = images.check_serve(tmp_path, image_store, image_data / row["path"])
    assert result["unauthenticated_status"] in (400, 401)
    assert set(result["probabilities"]) == {"normal", "benign", "malignant"}
    assert result["healthcheck"] == 0


def test_kserve_image_answers_an_authenticated_oip_v2_infer(built, image_store, image_data, tmp_path):
    import csv
    with open(image_data / "images.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test")
    result = images.check_kserve(tmp_path, image_store, image_data / row["path"])
    assert result["unauthenticated_status"] == 401
    assert set(result["probabilities"]) == {"normal", "benign", "malignant"}
    assert result["healthcheck"] == 0
    config = images.image_config(built["kserve"])
    assert config["Entrypoint"][:3] == ["python", "-m", "medxplain_kserve"]
    assert {"8080/tcp", "8081/tcp"} == set(config.get("ExposedPorts") or {})


@pytest.fixture(scope="module")
def image_minio(tmp_path_factory) -> MinioServer:
    """A host MinIO of the devstack, for the batch and UI images (the minio image has its own test)."""
    root = tmp_path_factory.mktemp("images-minio")
    server = MinioServer(data_dir=root / "data", log_path=root / "minio.log").start()
    server.client().make_bucket("images-test")
    yield server
    server.stop()


def test_batch_image_writes_one_item_and_the_ui_image_shows_it(built, image_store, image_data, image_minio, tmp_path):
    env = images.s3_env_lines(image_minio.endpoint, image_minio.access_key, image_minio.secret_key)
    result = images.check_batch(tmp_path, image_store / "ddsm.mar", image_data, env, "s3://images-test/runs/one",
                                image_minio.client())
    assert result["items"] == 1
    ui = images.check_ui(tmp_path, env, "s3://images-test/runs")
    assert ui["healthcheck"] == 0
    if shutil.which("chromium"):
        assert ui["cases_rendered"] == "Class probabilities"
