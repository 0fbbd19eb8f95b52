"""Faults against real processes and the real MinIO: a killed job, a poison item that kills the
process, a MinIO outage mid-run, wrong credentials, a re-run with other options, objects changed
after they were written, two writers on one shard and two mergers at once.

Each test checks that every item exists exactly once, complete (its marker lists its objects with
matching sha256), and that nothing is mixed, overwritten or used unverified.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from batch.claims import HEARTBEAT_ENV
from batch.cli import main
from batch.faults import KILL_ON_SOURCE
from batch.merge import merge
from devstack.services import MinioServer
from medxplain_contract.storage import Bucket, PreconditionFailed, S3Config
from tests.batch_support import (
    REPO_ROOT,
    check_complete_items,
    cli,
    cli_env,
    env_file,
    objects,
    read,
    source_ids,
    subset,
)
from ui.runs import IntegrityError, Run

N_ITEMS = 6


@pytest.fixture(scope="module")
def small_set(ddsm_data, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ddsm-faults")
    return dest, subset(ddsm_data, "ddsm", N_ITEMS, dest)


def _ids(client, bucket: str, prefix: str, rows) -> set[str]:
    mapping = source_ids(client, bucket, prefix)
    return {mapping[r["path"]] for r in rows}


def _args(model_store, source, output: str, env) -> list[str]:
    return ["run", "--model", "ddsm", "--archive", str(model_store / "ddsm.mar"), "--input", str(source),
            "--output", output, "--explain", "cam", "--batch-size", "1", "--threads", "2", "--s3-env", str(env),
            "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    return {**cli_env(), HEARTBEAT_ENV: "0.5", **extra}


def _start(args: list[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=REPO_ROOT, env=_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=REPO_ROOT, env=_env(**extra),
                          capture_output=True, text=True, timeout=300, check=False)


def _s3(server) -> S3Config:
    return S3Config(server.endpoint, False, server.access_key, server.secret_key)


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


@pytest.fixture(scope="module")
def killed_run(small_set, model_store, minio_server, tmp_path_factory):
    """A run killed mid-way and resumed (the first test checks it; later ones damage copies of it)."""
    source, rows = small_set
    env = env_file(minio_server, tmp_path_factory.mktemp("killed") / "minio.env")
    args = _args(model_store, source, "s3://batch-faults/killed", env)
    return {"args": args, "env": env, "rows": rows}


def test_killed_job_resumes_with_every_item_exactly_once(killed_run, minio_server):
    args, rows = killed_run["args"], killed_run["rows"]
    client = minio_server.client()
    proc = _start(args)
    done = _wait_for_markers(client, "batch-faults", "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert done < N_ITEMS
    ids = _ids(client, "batch-faults", "killed", rows)
    names = objects(client, "batch-faults", "killed")
    assert "run.json" not in names and not any(k.startswith("shards/") for k in names)
    # Simulate the worst case of a kill: an item with some objects but no completion marker.
    unfinished = sorted(i for i in ids if f"items/{i}/_complete.json" not in names)
    client.put_object("batch-faults", f"killed/items/{unfinished[0]}/result.json", io.BytesIO(b"{"), 1)
    again = _run(args)  # the killed writer's heartbeat stopped: its attempt markers are taken over
    assert again.returncode == 0, again.stderr
    assert _processed(again.stdout) == len(unfinished)
    check_complete_items(client, "batch-faults", "killed", ids)
    json.loads(read(client, "batch-faults", f"killed/items/{unfinished[0]}/result.json"))
    run = json.loads(read(client, "batch-faults", "killed/run.json"))
    assert run["counts"]["complete"] == N_ITEMS and run["counts"]["failed"] == 0
    assert not any(k.startswith(("attempts/", "locks/")) for k in objects(client, "batch-faults", "killed"))


def test_poison_item_that_kills_the_process_goes_to_failures_and_the_run_completes(
        small_set, model_store, minio_server, tmp_path):
    source, rows = small_set
    env = env_file(minio_server, tmp_path / "minio.env")
    args = [*_args(model_store, source, "s3://batch-faults/poison", env), "--max-attempts", "2"]
    poison = rows[1]["path"]
    client = minio_server.client()
    for attempt in (1, 2):  # the process dies (SIGKILL) when it starts decoding the poison input
        crashed = _run(args, **{KILL_ON_SOURCE: poison})
        assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
        poison_id = source_ids(client, "batch-faults", "poison")[poison]
        marker = json.loads(read(client, "batch-faults", f"poison/attempts/{poison_id}.json"))
        assert marker["attempts"] == attempt
    finished = _run(args, **{KILL_ON_SOURCE: poison})  # still armed: the item must not be decoded again
    assert finished.returncode == 1, finished.stderr
    assert f"failed: {poison_id} (poison_item)" in finished.stdout
    others = _ids(client, "batch-faults", "poison", rows) - {poison_id}
    names = objects(client, "batch-faults", "poison")
    check_complete_items(client, "batch-faults", "poison", others)
    record = json.loads(read(client, "batch-faults", f"poison/failures/{poison_id}.json"))
    assert record["error"] == "poison_item" and "2 attempts" in record["message"]
    run = json.loads(read(client, "batch-faults", "poison/run.json"))
    assert run["counts"]["complete"] == N_ITEMS - 1 and run["counts"]["failed"] == 1
    assert [f["id"] for f in run["failures"]] == [poison_id]
    assert {k for k in names if k.startswith("attempts/")} == {f"attempts/{poison_id}.json"}  # stays poison
    assert not any(k.startswith(("writers/", "locks/")) for k in names)


def test_rerun_with_other_options_is_refused_not_mixed(killed_run, minio_server):
    client = minio_server.client()
    before = {k: o.etag for k, o in objects(client, "batch-faults", "killed").items()}
    for change in (["--top-k", "5"], ["--explain", "cam,gradcam"]):
        args = [*killed_run["args"], *change]
        refused = _run(args)
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "was run with other options" in lines[0] and "new --output" in lines[0]
        assert ("top_k 8 -> 5" in lines[0]) == (change[0] == "--top-k")
        assert ('explain ["cam"] -> ["cam", "gradcam"]' in lines[0]) == (change[0] == "--explain")
    assert {k: o.etag for k, o in objects(client, "batch-faults", "killed").items()} == before


def _copy_run(client, source: str, target: str) -> None:
    from minio.commonconfig import CopySource

    for key in objects(client, "batch-faults", source):
        client.copy_object("batch-faults", f"{target}/{key}", CopySource("batch-faults", f"{source}/{key}"))


def test_changed_objects_are_reported_not_used_by_merge_and_ui(killed_run, minio_server):
    client = minio_server.client()
    _copy_run(client, "killed", "tampered")
    ids = sorted(_ids(client, "batch-faults", "tampered", killed_run["rows"]))
    # a valid object of another item (silently plausible) and a changed heatmap (read lazily)
    other = read(client, "batch-faults", f"tampered/items/{ids[1]}/features.npz")
    client.put_object("batch-faults", f"tampered/items/{ids[0]}/features.npz", io.BytesIO(other), len(other))
    client.put_object("batch-faults", f"tampered/items/{ids[2]}/heatmaps/cam.png", io.BytesIO(b"x" * 10), 10)
    bad = {f"items/{ids[0]}/features.npz", f"items/{ids[2]}/heatmaps/cam.png"}
    result = _run(["merge", "--output", "s3://batch-faults/tampered", "--force", "--s3-env",
                   str(killed_run["env"]), "--no-progress"])
    assert result.returncode == 1, result.stderr
    assert all(f"integrity: {key} (sha256_mismatch)" in result.stdout for key in bad), result.stdout
    run = json.loads(read(client, "batch-faults", "tampered/run.json"))
    assert {p["key"] for p in run["integrity"]} == bad and run["counts"]["integrity_failed"] == 2
    assert run["counts"]["complete"] == N_ITEMS - 2
    assert set(json.loads(read(client, "batch-faults", "tampered/index/ids.json"))) == set(ids) - {ids[0], ids[2]}
    # the UI reader checks the same markers and run.json's digests
    ui_run = Run(client, "batch-faults", "tampered")
    with pytest.raises(IntegrityError, match="features.npz"):
        ui_run.features(ids[0])
    with pytest.raises(IntegrityError, match="cam.png"):
        ui_run.heatmap(ids[2], "cam", ui_run.result(ids[2]))
    results = ui_run.results(ids)
    assert set(results) == set(ids) and ui_run.integrity_problems == []  # result.json files are intact
    junk = b"[]"
    client.put_object("batch-faults", f"tampered/items/{ids[3]}/result.json", io.BytesIO(junk), len(junk))
    client.put_object("batch-faults", "tampered/index/ids.json", io.BytesIO(junk), len(junk))
    fresh = Run(client, "batch-faults", "tampered")
    assert ids[3] not in fresh.results(ids) and [p.key for p in fresh.integrity_problems] == [
        f"tampered/items/{ids[3]}/result.json"]
    with pytest.raises(IntegrityError, match="index/ids.json"):
        fresh.embeddings()


def test_two_writers_on_one_shard_split_the_items_without_overwriting(small_set, model_store, minio_server,
                                                                      tmp_path):
    source, rows = small_set
    env = env_file(minio_server, tmp_path / "minio.env")
    args = _args(model_store, source, "s3://batch-faults/twins", env)
    procs = [_start(args), _start(args)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "completed by another writer" not in err  # nobody overwrote a committed item
    client = minio_server.client()
    ids = _ids(client, "batch-faults", "twins", rows)
    check_complete_items(client, "batch-faults", "twins", ids)
    assert sum(_processed(out) for out, _ in outputs) == N_ITEMS  # every item processed exactly once
    summary = json.loads(read(client, "batch-faults", "twins/shards/00000-of-00001.json"))
    assert len(summary["invocations"]) == 2 and summary["processed"] == N_ITEMS  # both summaries landed
    run = json.loads(read(client, "batch-faults", "twins/run.json"))
    assert run["counts"]["complete"] == N_ITEMS and run["counts"]["processed"] == N_ITEMS
    assert not any(k.startswith(("attempts/", "writers/", "locks/")) for k in objects(client, "batch-faults", "twins"))


def test_two_mergers_at_once_write_the_run_once(killed_run, minio_server, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, "0.5")
    client = minio_server.client()
    _copy_run(client, "killed", "two-mergers")
    client.remove_object("batch-faults", "two-mergers/run.json")
    barrier = threading.Barrier(2)
    outcomes, errors = [], []

    def merger() -> None:
        try:
            barrier.wait()
            outcomes.append(merge("s3://batch-faults/two-mergers", s3=_s3(minio_server)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=merger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(o.wrote for o in outcomes) == [False, True]  # one merged, the other found nothing to do
    assert outcomes[0].run["state"] == outcomes[1].run["state"]
    run = json.loads(read(client, "batch-faults", "two-mergers/run.json"))
    assert run["counts"]["complete"] == N_ITEMS and run["state"] == outcomes[0].run["state"]
    assert not any(k.startswith(("locks/", "writers/")) for k in objects(client, "batch-faults", "two-mergers"))


def test_conditional_writes_on_the_pinned_minio(minio_server):
    bucket = Bucket(_s3(minio_server), "batch-faults")
    bucket.ensure(create=True)
    etag = bucket.put_if("conditional/once.json", b"{}")
    with pytest.raises(PreconditionFailed):
        bucket.put_if("conditional/once.json", b"[]")  # If-None-Match: * -> 412
    newer = bucket.put_if("conditional/once.json", b"[1]", if_match=etag)
    with pytest.raises(PreconditionFailed):
        bucket.put_if("conditional/once.json", b"[2]", if_match=etag)  # stale If-Match -> 412
    assert bucket.get_versioned("conditional/once.json").etag == newer
    winners, barrier = [], threading.Barrier(8)

    def create(n: int) -> None:
        barrier.wait()
        try:
            bucket.put_if("conditional/race.json", f'{{"n": {n}}}'.encode())
            winners.append(n)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and json.loads(bucket.get("conditional/race.json")) == {"n": winners[0]}


def test_minio_outage_mid_run_is_retried_or_fails_cleanly_and_rerun_completes(small_set, model_store,
                                                                               tmp_path_factory):
    source, rows = small_set
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
        again = _run(args)
        assert again.returncode == 0, again.stderr
        client = server.client()
        check_complete_items(client, "outage", "run", _ids(client, "outage", "run", rows))
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
