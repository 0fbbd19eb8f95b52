"""Archive integrity: a tampered .mar is refused before TorchServe, the serve entrypoint or a batch job loads it.

The ``.mar`` carries the handler code TorchServe executes, so every loader checks its sha256 against
the published ``<name>.mar.sha256`` (HMAC-signed when a key is configured) first. Archives are the
session's real ones (trained test-profile models); tampering is done on copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batch.archive import ArchiveError, load_archive
from devstack.services import ServiceError, TorchServeServer
from medxplain_contract.integrity import (
    ArchiveIntegrityError,
    sha256_file,
    signing_key,
    verify_archive,
    verify_store,
    write_digest,
)

ROOT = Path(__file__).resolve().parents[1]


def copy_store(model_store: Path, target: Path, names=("ddsm",)) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".mar", ".mar.sha256", ".mar.json"):
            shutil.copyfile(model_store / f"{name}{suffix}", target / f"{name}{suffix}")
    return target


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def key_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "archive-key"
    path.write_text("k" * 40)
    monkeypatch.setenv("MEDXAI_ARCHIVE_KEY_FILE", str(path))
    return path


def test_archive_step_publishes_a_digest_that_matches(model_store):
    for name in ("ddsm", "adni"):
        line = (model_store / f"{name}.mar.sha256").read_text()
        assert line == f"{sha256_file(model_store / f'{name}.mar')}  {name}.mar\n"  # sha256sum -c format
        assert verify_archive(model_store / f"{name}.mar") == line.split()[0]


def test_tampered_missing_and_forged_digests_are_refused(model_store, tmp_path, key_file):
    store = copy_store(model_store, tmp_path / "store")
    mar = store / "ddsm.mar"
    key = signing_key()
    write_digest(mar, key)
    assert verify_archive(mar, key) == sha256_file(mar)  # signed and intact: accepted
    flip_byte(mar)
    with pytest.raises(ArchiveIntegrityError, match="does not match the published"):
        verify_archive(mar, key)
    # Whoever can write the bucket replaces archive and digest together: only the signature catches it.
    shutil.copyfile(model_store / "adni.mar", mar)
    (store / "ddsm.mar.sha256").write_text(f"{sha256_file(mar)}  ddsm.mar\n")
    assert verify_archive(mar) == sha256_file(mar)  # unsigned: consistent, hence the signing key
    with pytest.raises(ArchiveIntegrityError, match="signature does not match"):
        verify_archive(mar, key)
    (store / "ddsm.mar.sha256.sig").unlink()
    with pytest.raises(ArchiveIntegrityError, match="no signature"):
        verify_archive(mar, key)
    (store / "ddsm.mar.sha256").unlink()
    with pytest.raises(ArchiveIntegrityError, match="no ddsm.mar.sha256"):
        verify_archive(mar)
    # a separately stored list wins over the files next to the archive
    with pytest.raises(ArchiveIntegrityError, match="does not match"):
        verify_archive(mar, digests={"ddsm.mar": sha256_file(model_store / "ddsm.mar")})
    with pytest.raises(ArchiveIntegrityError, match="not in the digest list"):
        verify_archive(mar, digests={})


def test_torchserve_refuses_a_tampered_archive_and_serves_verified_ones(model_store, torchserve, tmp_path):
    store = copy_store(model_store, tmp_path / "store")
    flip_byte(store / "ddsm.mar")
    server = TorchServeServer(workdir=tmp_path / "ts", model_store=store, models={"ddsm": "ddsm.mar"})
    with pytest.raises(ServiceError) as err:
        server.start(timeout=60)
    message = str(err.value)
    assert "ddsm.mar" in message and "does not match" in message and "\n" not in message
    assert server.pid is None and not (tmp_path / "ts" / "logs").exists()  # TorchServe never started
    # the session's server went through the same check: its archives are the verified ones
    assert torchserve.verify_archives() == {n: sha256_file(model_store / f"{n}.mar") for n in ("ddsm", "adni")}
    import requests

    models = requests.get(f"{torchserve.inference_url}/ping", headers=torchserve.auth_header(), timeout=10)
    assert models.status_code == 200


def test_serve_entrypoint_verifies_before_exec(model_store, tmp_path):
    entry = [sys.executable, str(ROOT / "docker" / "serve" / "entrypoint.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    env.pop("MEDXAI_ARCHIVE_KEY_FILE", None)
    good = copy_store(model_store, tmp_path / "good", ("ddsm", "adni"))
    # good archives: verified, then TorchServe is exec'd; an option its own parser rejects (--version
    # with --start) makes it exit at once instead of serving, which shows that it was reached
    proc = subprocess.run([*entry, "--model-store", str(good), "--version"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert "verified ddsm.mar" in proc.stdout and "verified adni.mar" in proc.stdout, proc.stderr
    assert "usage: torchserve" in proc.stderr and "not allowed with argument --start" in proc.stderr
    bad = copy_store(model_store, tmp_path / "bad", ("ddsm", "adni"))
    flip_byte(bad / "adni.mar")
    proc = subprocess.run([*entry, "--model-store", str(bad), "--version"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 1 and "usage: torchserve" not in proc.stderr and "verified" not in proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "adni.mar" in proc.stderr and "Traceback" not in proc.stderr
    assert set(verify_store(good)) == {"ddsm.mar", "adni.mar"}


def test_batch_job_refuses_a_tampered_archive(model_store, minio_server, tmp_path, capsys):
    from batch.cli import main
    from tests.batch_support import env_file

    loaded = load_archive(model_store / "ddsm.mar", "ddsm")  # the good one loads
    try:
        assert loaded.sha256 == sha256_file(model_store / "ddsm.mar") and loaded.engine.kind == "ddsm"
    finally:
        loaded.close()
    store = copy_store(model_store, tmp_path / "store")
    flip_byte(store / "ddsm.mar")
    with pytest.raises(ArchiveError, match="does not match"):
        load_archive(store / "ddsm.mar", "ddsm")
    (tmp_path / "in").mkdir()
    code = main(["run", "--model", "ddsm", "--archive", str(store / "ddsm.mar"), "--input", str(tmp_path / "in"),
                 "--output", "s3://integrity-test/runs/x", "--s3-env", str(env_file(minio_server, tmp_path / "m.env"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not match" in err and err.count("\n") == 0 and "Traceback" not in err


def _rewrite_without(mar: Path, member: str) -> None:
    """The archive minus one member, with a fresh (unsigned) digest: an intact archive of an older layout."""
    import zipfile

    data = {}
    with zipfile.ZipFile(mar) as zf:
        for info in zf.infolist():
            if info.filename != member:
                data[info.filename] = zf.read(info)
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in data.items():
            zf.writestr(name, body)
    write_digest(mar, None)


def test_batch_job_refuses_an_archive_of_other_engine_code(ddsm_bundle, minio_server, tmp_path, capsys, monkeypatch):
    """An archive built from different engine code (one comment line changed) is intact but refused, exit 2;
    so is one without engine.json. The batch job runs its own engine, so it must be the archive's."""
    import json
    import zipfile

    from batch.cli import main
    from tests.batch_support import env_file

    monkeypatch.delenv("MEDXAI_ARCHIVE_KEY_FILE", raising=False)
    other = tmp_path / "other-checkout"
    for package in ("medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine", "handlers",
                    "model_store"):
        shutil.copytree(ROOT / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "medxplain_engine" / "budget.py", "a") as f:
        f.write("# another engine build\n")
    env = {**os.environ, "PYTHONPATH": str(other), "TMPDIR": str(tmp_path)}
    env.pop("MEDXAI_ARCHIVE_KEY_FILE", None)
    built = subprocess.run([sys.executable, "-m", "model_store", "archive", "--bundle", str(ddsm_bundle[0]),
                            "--out", str(tmp_path / "store")], cwd=other, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    mar = tmp_path / "store" / "ddsm.mar"
    verify_archive(mar)  # intact and published: only its engine code differs
    with zipfile.ZipFile(mar) as zf:
        assert b"# another engine build" in zf.read("medxplain_engine/budget.py")
        archived = json.loads(zf.read("engine.json"))
    from medxplain_engine.version import engine_record

    assert archived["code_sha256"] != engine_record()["code_sha256"]
    with pytest.raises(ArchiveError, match="carries engine code"):
        load_archive(mar, "ddsm")
    (tmp_path / "in").mkdir()
    s3_env = str(env_file(minio_server, tmp_path / "m.env"))
    for expected in ("carries engine code " + archived["code_sha256"][:12], "carries no engine.json"):
        code = main(["run", "--model", "ddsm", "--archive", str(mar), "--input", str(tmp_path / "in"),
                     "--output", "s3://integrity-test/runs/engine", "--s3-env", s3_env])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and err.count("\n") == 0 and "Traceback" not in err, err
        _rewrite_without(mar, "engine.json")
