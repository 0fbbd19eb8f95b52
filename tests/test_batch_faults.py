"""Faults against real processes: a killed batch job, a MinIO outage mid-run, wrong credentials.

Each test ends by re-running and checking that every item exists exactly once, complete (its
marker lists its objects with matching sha256), and that no failure records are left behind.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from batch.cli import main
from devstack.services import MinioServer
from tests.batch_support import REPO_ROOT, check_complete_items, cli, cli_env, env_file, item_id, objects, read, subset

N_ITEMS = 6


@pytest.fixture(scope="module")
def small_set(ddsm_data, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ddsm-faults")
    return dest, {item_id(r["path"]) for r in subset(ddsm_data, "ddsm", N_ITEMS, dest)}


def _args(model_store, source, output: str, env) -> list[str]:
    return ["run", "--model", "ddsm", "--archive", str(model_store / "ddsm.mar"), "--input", str(source),
            "--output", output, "--batch-size", "1", "--threads", "2", "--s3-env", str(env), "--no-progress"]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_markers(client, bucket: str, prefix: str, proc: subprocess.Popen, at_least: int = 1,
                      timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended before it could be interrupted: {proc.communicate()}"
        try:
            done = sum(k.endswith("/_complete.json") for k in objects(client, bucket, prefix))
        except Exception:  # noqa: BLE001 - bucket not created yet
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError("no item completed in time")


def _processed(stdout: str) -> int:
    return int(stdout.split(" items, ")[1].split(" processed")[0])


def test_killed_job_resumes_with_every_item_exactly_once(small_set, model_store, minio_server, tmp_path):
    source, ids = small_set
    env = env_file(minio_server, tmp_path / "minio.env")
    args = _args(model_store, source, "s3://batch-faults/killed", env)
    client = minio_server.client()
    proc = _start(args)
    done = _wait_for_markers(client, "batch-faults", "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert done < N_ITEMS
    names = objects(client, "batch-faults", "killed")
    assert "run.json" not in names and not any(k.startswith("shards/") for k in names)
    # Simulate the worst case of a kill: an item with some objects but no completion marker.
    unfinished = sorted(i for i in ids if f"items/{i}/_complete.json" not in names)
    client.put_object("batch-faults", f"killed/items/{unfinished[0]}/result.json", io.BytesIO(b"{"), 1)
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert _processed(again.stdout) == len(unfinished)
    check_complete_items(client, "batch-faults", "killed", ids)
    json.loads(read(client, "batch-faults", f"killed/items/{unfinished[0]}/result.json"))
    run = json.loads(read(client, "batch-faults", "killed/run.json"))
    assert run["counts"]["complete"] == N_ITEMS and run["counts"]["failed"] == 0


def test_minio_outage_mid_run_is_retried_or_fails_cleanly_and_rerun_completes(small_set, model_store,
                                                                               tmp_path_factory):
    source, ids = small_set
    root = tmp_path_factory.mktemp("minio-outage")
    server = MinioServer(data_dir=root / "data", log_path=root / "minio.log").start()
    try:
        env = env_file(server, root / "minio.env")
        args = _args(model_store, source, "s3://outage/run", env)
        proc = _start(args)
        _wait_for_markers(server.client(), "outage", "run", proc)
        server.stop()
        time.sleep(3)
        server.start()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), err
        assert "Traceback" not in err
        again = cli(*args)
        assert again.returncode == 0, again.stderr
        client = server.client()
        check_complete_items(client, "outage", "run", ids)
        names = objects(client, "outage", "run")
        assert not any(k.startswith("failures/") for k in names)
        run = json.loads(read(client, "outage", "run/run.json"))
        assert run["counts"]["complete"] == N_ITEMS and run["counts"]["failed"] == 0 and run["failures"] == []
    finally:
        server.stop()


def test_wrong_credentials_give_one_clear_line_and_exit_2(small_set, model_store, minio_server, tmp_path):
    source, _ = small_set
    env = env_file(minio_server, tmp_path / "wrong.env", access_key="not-the-user", secret_key="not-the-secret")
    result = cli(*_args(model_store, source, "s3://batch-faults/wrong", env))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "MEDXAI_S3_ACCESS_KEY" in lines[0]
    assert "not-the-secret" not in result.stderr


def test_usage_errors_exit_2_with_a_message(small_set, model_store, minio_server, tmp_path, capsys, monkeypatch):
    source, _ = small_set
    env = str(env_file(minio_server, tmp_path / "minio.env"))
    run = ["run", "--model", "ddsm", "--input", str(source), "--output", "s3://batch-faults/x", "--s3-env", env]
    assert main([*run, "--archive", str(tmp_path / "none.mar")]) == 2
    assert "model archive not found" in capsys.readouterr().err
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert main([*run, "--archive", str(model_store / "ddsm.mar"), "--shards", "2"]) == 2
    assert "JOB_COMPLETION_INDEX" in capsys.readouterr().err
    assert main([*run, "--archive", str(model_store / "ddsm.mar"), "--split", "no-such-split"]) == 2
    assert "no index row has that split" in capsys.readouterr().err
    assert main(["merge", "--output", "s3://batch-faults/nothing-here", "--s3-env", env]) == 2
    err = capsys.readouterr().err
    assert "no batch run" in err or "does not exist" in err
