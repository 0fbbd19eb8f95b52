"""Least privilege against the real MinIO: each component's own user can do its job and nothing else.

Users and policies are created by ``devstack.iam.apply`` (what the devstack, the compose init step
and the Kubernetes dev Job run) through MinIO's admin API; every check below is a real S3 request
answered by the server's policy engine.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from minio.error import S3Error

from devstack import iam
from medxplain_contract.storage import read_object

RESULTS, MODELS = "iam-results", "iam-models"
ROOT = Path(__file__).resolve().parents[1]


def put(client, bucket: str, key: str, data: bytes = b"x") -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def denied(call, *args) -> bool:
    try:
        call(*args)
    except S3Error as err:
        return err.code == "AccessDenied"
    return False


@pytest.fixture(scope="module")
def seeded(minio_server, storage_users):
    admin = minio_server.client()
    for bucket, key in ((RESULTS, "inputs/set/a.png"), (RESULTS, "runs/r1/run.json"), (RESULTS, "runs/r1/private/ids.json"),
                        (RESULTS, "annotations/ddsm/v/unit-0001/demo-a/1.json"), (MODELS, "releases/1.0/model-store/ddsm.mar")):
        put(admin, bucket, key, b"seed")
    return {c: cfg.client() for c, cfg in storage_users.items()}


def test_ui_reads_runs_and_adds_annotations_only(seeded):
    ui = seeded["ui"]
    assert read_object(ui, RESULTS, "runs/r1/run.json") == b"seed"
    assert "runs/r1/run.json" in [o.object_name for o in ui.list_objects(RESULTS, prefix="runs/", recursive=True)]
    assert denied(read_object, ui, RESULTS, "runs/r1/private/ids.json")  # id -> source key mapping
    assert read_object(seeded["batch"], RESULTS, "runs/r1/private/ids.json") == b"seed"
    put(ui, RESULTS, "annotations/ddsm/v/unit-0001/demo-b/2.json")
    assert read_object(ui, RESULTS, "annotations/ddsm/v/unit-0001/demo-b/2.json") == b"x"
    assert denied(put, ui, MODELS, "releases/1.0/model-store/ddsm.mar")  # cannot write models
    assert denied(put, ui, RESULTS, "runs/r1/run.json")  # nor runs
    assert denied(put, ui, RESULTS, "inputs/set/b.png")  # nor inputs
    assert denied(ui.remove_object, RESULTS, "annotations/ddsm/v/unit-0001/demo-a/1.json")  # nor delete answers
    assert denied(read_object, ui, RESULTS, "inputs/set/a.png")
    assert denied(lambda: list(ui.list_objects(RESULTS, prefix="inputs/", recursive=True)))  # input file names
    assert denied(lambda: list(ui.list_objects(RESULTS, recursive=True)))  # nor the whole bucket
    assert denied(read_object, ui, MODELS, "releases/1.0/model-store/ddsm.mar")
    assert denied(ui.make_bucket, "ui-made-bucket")


def test_batch_reads_inputs_and_models_and_writes_runs_only(seeded):
    batch = seeded["batch"]
    assert read_object(batch, RESULTS, "inputs/set/a.png") == b"seed"
    assert read_object(batch, MODELS, "releases/1.0/model-store/ddsm.mar") == b"seed"
    put(batch, RESULTS, "runs/r2/items/a/result.json")
    batch.remove_object(RESULTS, "runs/r2/items/a/result.json")  # stale failure records are removed on retry
    assert denied(put, batch, MODELS, "releases/1.0/model-store/ddsm.mar")  # cannot write models
    assert denied(put, batch, RESULTS, "annotations/ddsm/v/unit-0001/demo-a/1.json")
    assert denied(put, batch, RESULTS, "inputs/set/a.png")
    assert denied(batch.remove_object, RESULTS, "inputs/set/a.png")


def test_serve_only_reads_models(seeded):
    serve = seeded["serve"]
    assert read_object(serve, MODELS, "releases/1.0/model-store/ddsm.mar") == b"seed"
    assert [o.object_name for o in serve.list_objects(MODELS, prefix="releases/1.0/model-store/")] == [
        "releases/1.0/model-store/ddsm.mar"]
    assert denied(put, serve, MODELS, "releases/1.0/model-store/ddsm.mar")
    assert denied(read_object, serve, RESULTS, "runs/r1/run.json")
    assert denied(put, serve, RESULTS, "runs/r1/x.json")
    assert denied(serve.remove_object, MODELS, "releases/1.0/model-store/ddsm.mar")


def test_release_publishes_models_only(seeded):
    release = seeded["release"]
    put(release, MODELS, "releases/1.1/model-store/ddsm.mar")
    assert denied(put, release, RESULTS, "runs/r1/run.json")
    assert denied(read_object, release, RESULTS, "runs/r1/run.json")


def test_apply_is_idempotent_and_the_cli_writes_policy_documents(minio_server, storage_users, tmp_path):
    users = {"serve": iam.Credentials(storage_users["serve"].access_key, storage_users["serve"].secret_key)}
    iam.apply(minio_server.admin_config(), users, ("ui-test", RESULTS), (MODELS,))  # second run: no error
    assert read_object(storage_users["serve"].client(), MODELS, "releases/1.0/model-store/ddsm.mar") == b"seed"
    proc = subprocess.run([sys.executable, "-m", "devstack.iam", "policies", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    ui = json.loads((tmp_path / "medxai-ui.json").read_text())
    actions = {a for s in ui["Statement"] for a in s["Action"]}
    assert "s3:DeleteObject" not in actions and "arn:aws:s3:::medxai/annotations/*" in str(ui)
    assert {p.name for p in tmp_path.iterdir()} == {f"medxai-{c}.json" for c in iam.COMPONENTS}
    with pytest.raises(ValueError, match="unknown component"):
        iam.policy("admin")


def test_devstack_gives_each_component_its_own_user_and_env_file(tmp_path):
    """What `make serve` / `make demo` do: root only provisions; components get their own env files."""
    from devstack.services import MinioServer
    from devstack.stack import provision_storage, ui_env
    from medxplain_contract.storage import S3Config

    server = MinioServer(data_dir=tmp_path / "data", log_path=tmp_path / "minio.log").start()
    try:
        state = tmp_path / "state"
        state.mkdir()
        files = provision_storage(server, state)
        assert set(files) == {*iam.COMPONENTS, "admin"} and Path(files["batch"]).name == "minio.env"
        assert all(Path(f).stat().st_mode & 0o777 == 0o600 for f in files.values())
        configs = {c: S3Config.from_env({}, env_file=Path(f)) for c, f in files.items()}
        assert len({c.access_key for c in configs.values()}) == len(configs)  # one identity each
        assert configs["admin"].access_key == server.access_key
        ui, batch = configs["ui"].client(), configs["batch"].client()
        assert denied(put, ui, "medxai-models", "releases/1.0/model-store/ddsm.mar")
        assert denied(put, ui, "medxai", "runs/x/run.json")
        put(ui, "medxai", "annotations/ddsm/v/unit-0001/demo-a/1.json")
        put(batch, "medxai", "runs/x/run.json")
        assert denied(put, batch, "medxai-models", "releases/1.0/model-store/ddsm.mar")
        env = ui_env({"minio": {"credentials": files},
                      "torchserve": {"inference": "http://127.0.0.1:1", "token_file": "/nonexistent"}})
        assert env["MEDXAI_S3_ENV_FILE"] == files["ui"] and env["MEDXAI_UI_DEMO"] == "1"
    finally:
        server.stop()
