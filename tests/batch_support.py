"""Helpers shared by the batch-job tests: small input sets, storage settings, CLI runs, object checks."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

from medxplain_contract.storage import read_object
from tests.schema_check import checked

REPO_ROOT = Path(__file__).resolve().parents[1]
INDEX = {"ddsm": "images.csv", "adni": "subjects.csv"}


def subset(data_dir: Path, kind: str, n: int, dest: Path) -> list[dict]:
    """Copy the first ``n`` index rows (files and masks) and a matching index into ``dest``."""
    with open(data_dir / INDEX[kind], newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)[:n]
    dest.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for column in ("path", "mask_path"):
            (dest / row[column]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data_dir / row[column], dest / row[column])
    write_index(dest / INDEX[kind], fields, rows)
    return rows


def write_index(path: Path, fields, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def source_ids(client, bucket: str, prefix: str) -> dict[str, str]:
    """source key -> item id, from the run's private mapping (readable with the admin credentials only)."""
    record = json.loads(read(client, bucket, f"{prefix}/private/sources.json"))
    return {source: item for item, source in record["items"].items()}


def assert_no_source_names(client, bucket: str, prefix: str, source_keys) -> None:
    """No object key, and no JSON object outside private/, carries a source file's name (stem included)."""
    stems = {PurePosixPath(k).name.split(".")[0] for k in source_keys}
    for key in objects(client, bucket, prefix):
        assert not any(stem in key for stem in stems), key
        if key.endswith(".json") and not key.startswith("private/"):
            text = read(client, bucket, f"{prefix}/{key}").decode()
            assert not any(stem in text for stem in stems), f"{key} names a source file"


def env_file(server, path: Path, access_key: str | None = None, secret_key: str | None = None) -> Path:
    path.write_text(f"MEDXAI_S3_ENDPOINT=http://{server.endpoint}\n"
                    f"MEDXAI_S3_ACCESS_KEY={access_key or server.access_key}\n"
                    f"MEDXAI_S3_SECRET_KEY={secret_key or server.secret_key}\n")
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=cli_env(), check=False)


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}


def objects(client, bucket: str, prefix: str) -> dict[str, object]:
    """key (relative to the run prefix) -> listing entry."""
    return {o.object_name[len(prefix) + 1:]: o for o in client.list_objects(bucket, prefix=prefix + "/", recursive=True)}


read = read_object  # the contract's whole-object read (tests call it ``read``)


def check_complete_items(client, bucket: str, prefix: str, expected_ids: set[str]) -> dict[str, dict[str, bytes]]:
    """Every expected item (and no other) is complete: its marker lists exactly its objects, with their sha256."""
    listing = objects(client, bucket, prefix)
    by_item: dict[str, set[str]] = {}
    for key in listing:
        if key.startswith("items/"):
            item, _, rest = key[len("items/"):].partition("/")
            by_item.setdefault(item, set()).add(rest)
    assert set(by_item) == expected_ids, (sorted(by_item), sorted(expected_ids))
    contents = {}
    for item, names in by_item.items():
        assert "_complete.json" in names, f"{item} has no completion marker"
        marker = json.loads(read(client, bucket, f"{prefix}/items/{item}/_complete.json"))
        assert set(marker) == names - {"_complete.json"}, (item, sorted(marker), sorted(names))
        contents[item] = {}
        for name, digest in marker.items():
            data = read(client, bucket, f"{prefix}/items/{item}/{name}")
            assert hashlib.sha256(data).hexdigest() == digest, f"{item}/{name}: content does not match its marker"
            stat = client.stat_object(bucket, f"{prefix}/items/{item}/{name}")
            assert stat.metadata.get("x-amz-meta-sha256") == digest
            contents[item][name] = data
        checked(contents[item]["result.json"], "batch_result")  # every stored result against the contract
    return contents


def without_timing(result_json: bytes) -> dict:
    result = json.loads(result_json)
    result.pop("timing_ms", None)
    return result
