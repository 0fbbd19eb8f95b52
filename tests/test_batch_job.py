"""The batch job against the real MinIO with the session's small trained models.

Full run (every object exists, parses, matches its marker; manifest counts), no-op re-run, two
shards + merge equal one unsharded run (same id key), corrupt inputs recorded without stopping the
run, MRI outputs, batch == online (TorchServe) for the same input, and pseudonymous, stable ids.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch.archive import ArchiveError, safe_extract
from batch.pseudonyms import PseudonymError, Pseudonyms
from batch.runner import RunOptions, run_batch
from batch.sources import SourceError, assign_ids, shard_of
from medxplain_client import Client
from medxplain_contract.storage import S3Config
from medxplain_engine.version import engine_record
from medxplain_models.bundle import mar_digest, sha256_file
from tests.batch_support import (
    assert_no_source_names,
    check_complete_items,
    cli,
    env_file,
    objects,
    read,
    source_ids,
    subset,
    without_timing,
    write_index,
)
from tests.schema_check import checked

N_DDSM = 6
ID_KEY = b"test-id-key-0123456789abcdef"  # one key for the runs compared byte for byte


@pytest.fixture(scope="module")
def s3(minio_server) -> S3Config:
    return S3Config(minio_server.endpoint, False, minio_server.access_key, minio_server.secret_key)


@pytest.fixture(scope="module")
def ddsm_small(ddsm_data, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ddsm-small")
    return dest, subset(ddsm_data, "ddsm", N_DDSM, dest)


@pytest.fixture(scope="module")
def ddsm_run(ddsm_small, model_store, minio_server, tmp_path_factory):
    """One unsharded CLI run with a heatmap method; the other tests compare against it."""
    source, rows = ddsm_small
    work = tmp_path_factory.mktemp("env")
    env = env_file(minio_server, work / "minio.env")
    (work / "id.key").write_bytes(ID_KEY)
    args = ["run", "--model", "ddsm", "--archive", str(model_store / "ddsm.mar"), "--input", str(source),
            "--output", "s3://batch-job/full", "--explain", "cam", "--batch-size", "2", "--threads", "2",
            "--s3-env", str(env), "--id-key-file", str(work / "id.key"), "--no-progress"]
    first = cli(*args)
    second = cli(*args)
    return {"args": args, "first": first, "second": second, "rows": rows, "env": env}


def item_id(key: str) -> str:
    """The id the runs with ID_KEY give to a source key."""
    return Pseudonyms(ID_KEY).item_id(key)


def test_full_run_writes_every_object_and_a_matching_manifest(ddsm_run, minio_server, model_store):
    first = ddsm_run["first"]
    assert first.returncode == 0, first.stderr
    assert "6 items, 6 processed, 0 skipped" in first.stdout and "items/s" in first.stdout
    client = minio_server.client()
    ids = {item_id(r["path"]) for r in ddsm_run["rows"]}
    contents = check_complete_items(client, "batch-job", "full", ids)
    for row in ddsm_run["rows"]:
        item = contents[item_id(row["path"])]
        assert set(item) == {"result.json", "features.npz", "heatmaps/cam.png", "input.png", "mask.png"}
        result = json.loads(item["result.json"])
        assert result["item"] == {"id": item_id(row["path"]), "case_id": Pseudonyms(ID_KEY).case_id(row["case_id"]),
                                  "truth": int(row["label"]), "mask": "mask.png"}
        assert len(result["units"]) == 8 and "data" not in result["heatmaps"]["cam"]
        assert result["heatmaps"]["cam"]["object"] == "heatmaps/cam.png"
        heatmap = Image.open(io.BytesIO(item["heatmaps/cam.png"]))
        assert heatmap.size == (result["input"]["width"], result["input"]["height"])
        shown = Image.open(io.BytesIO(item["input.png"]))
        assert shown.mode == "L" and list(shown.size[::-1]) == result["input"]["analysed_size"]
        assert not shown.info  # no text chunks or other metadata travel with the display copy
        with np.load(io.BytesIO(item["features.npz"])) as npz:
            units = npz["pooled"].shape[0]
            assert npz["peak"].shape == (units, 2) and npz["peak_maps"].shape == (units, 7, 7)
            assert np.isclose(np.linalg.norm(npz["embedding"]), 1.0, atol=1e-5)
            assert list(npz["map_shape"]) == result["input"]["map_shape"]
            top = result["units"][0]
            assert np.isclose(npz["pooled"][top["unit"]], top["activation"], rtol=1e-5)
    run = json.loads(read(client, "batch-job", "full/run.json"))
    assert run["counts"] == {"items": N_DDSM, "complete": N_DDSM, "failed": 0, "integrity_failed": 0,
                             "processed": N_DDSM, "skipped": 0}
    assert run["model"]["archive_sha256"] == sha256_file(model_store / "ddsm.mar")
    assert run["model"]["archive_digest"] == mar_digest(model_store / "ddsm.mar")
    with zipfile.ZipFile(model_store / "ddsm.mar") as zf:
        archived_engine = json.loads(zf.read("engine.json"))  # the job ran exactly the archive's engine code
    assert run["model"]["engine"] == archived_engine == engine_record()
    shard = json.loads(read(client, "batch-job", "full/shards/00000-of-00001.json"))
    assert shard["engine"] == archived_engine
    assert json.loads(read(client, "batch-job", "full/model/archive.json"))["engine"] == archived_engine
    assert run["code_version"] and run["arguments"]["explain"] == ["cam"] and run["failures"] == []
    assert run["truth"] == "source index images.csv" and len(run["shards"]) == 1
    listing = objects(client, "batch-job", "full")
    for key in run["outputs"]:
        assert key in listing, f"run-level output {key} missing"
        if key.endswith(".json"):
            json.loads(read(client, "batch-job", f"full/{key}"))
    assert {"index/similarity.json", "index/embeddings.npy", "units/rankings.json", "report.json"} <= set(run["outputs"])
    with np.load(io.BytesIO(read(client, "batch-job", "full/model/classifier.npz"))) as npz:
        assert npz["weight"].shape == (3, units) and npz["bias"].shape == (3,)
    assert {"model/model.json", "model/model_card.json", "shards/00000-of-00001.json"} <= set(listing)
    assert not any(k.startswith(("attempts/", "writers/", "locks/")) for k in listing)  # all released
    assert set(run["objects"]) >= set(run["outputs"]) | {"model/model.json"}
    assert source_ids(client, "batch-job", "full") == {r["path"]: item_id(r["path"]) for r in ddsm_run["rows"]}
    assert_no_source_names(client, "batch-job", "full", [r["path"] for r in ddsm_run["rows"]])
    assert not any(r["path"] in ddsm_run["first"].stdout + ddsm_run["first"].stderr for r in ddsm_run["rows"])


def test_rerun_is_a_no_op(ddsm_run, minio_server):
    second = ddsm_run["second"]
    assert second.returncode == 0, second.stderr
    assert "0 processed, 6 skipped" in second.stdout
    client = minio_server.client()
    before = {k: (o.etag, o.last_modified) for k, o in objects(client, "batch-job", "full").items()}
    assert cli(*ddsm_run["args"]).returncode == 0
    after = {k: (o.etag, o.last_modified) for k, o in objects(client, "batch-job", "full").items()}
    assert after == before  # nothing rewritten, not even the manifest


def test_two_shards_and_merge_equal_one_unsharded_run(ddsm_run, ddsm_small, model_store, s3, minio_server):
    source, rows = ddsm_small
    ids = sorted(item_id(r["path"]) for r in rows)
    assert {shard_of(i, 2) for i in ids} == {0, 1}, "the test set should populate both shards"
    base = {"model": "ddsm", "archive": model_store / "ddsm.mar", "input": str(source),
            "output": "s3://batch-job/sharded", "explain": ("cam",), "batch_size": 2, "s3": s3, "progress": False,
            "shards": 2, "id_key": ID_KEY}
    first = run_batch(RunOptions(**base, shard=1))
    assert first.exit_code == 0 and not first.merged  # shard 0 has not finished
    second = run_batch(RunOptions(**base, shard=0))
    assert second.merged and first.processed + second.processed == len(rows)
    client = minio_server.client()
    sharded = check_complete_items(client, "batch-job", "sharded", set(ids))
    single = check_complete_items(client, "batch-job", "full", set(ids))
    for item in ids:
        assert sharded[item].keys() == single[item].keys()
        for name in single[item]:
            if name == "result.json":
                assert without_timing(sharded[item][name]) == without_timing(single[item][name])
            else:
                assert sharded[item][name] == single[item][name], f"{item}/{name} differs"
    run_s = json.loads(read(client, "batch-job", "sharded/run.json"))
    run_1 = json.loads(read(client, "batch-job", "full/run.json"))
    assert run_s["outputs"] == run_1["outputs"] and len(run_s["shards"]) == 2
    assert run_s["counts"]["complete"] == run_1["counts"]["complete"] == len(rows)
    for key in run_1["outputs"]:
        if key != "analyses.json":  # carries the analyses' timings
            assert read(client, "batch-job", f"sharded/{key}") == read(client, "batch-job", f"full/{key}"), key


def test_corrupt_inputs_are_recorded_and_do_not_stop_the_run(ddsm_data, model_store, s3, minio_server, tmp_path):
    rows = subset(ddsm_data, "ddsm", 2, tmp_path)
    good = (tmp_path / rows[0]["path"]).read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(good[:200])
    (tmp_path / "images" / "noise.png").write_bytes(np.random.default_rng(0).bytes(5000))
    extra = [{**rows[0], "image_id": n, "path": f"images/{n}.png", "mask_path": ""} for n in ("truncated", "noise")]
    write_index(tmp_path / "images.csv", list(rows[0]), rows + extra)
    options = RunOptions(model="ddsm", archive=model_store / "ddsm.mar", input=str(tmp_path),
                         output="s3://batch-job/corrupt", s3=s3, progress=False, batch_size=4)
    result = run_batch(options)
    assert result.exit_code == 1 and result.processed == 2 and result.merged
    client = minio_server.client()
    ids = source_ids(client, "batch-job", "corrupt")
    truncated, noise = ids["images/truncated.png"], ids["images/noise.png"]
    assert set(result.failed) == {truncated, noise}
    for name in result.failed:
        record = json.loads(read(client, "batch-job", f"corrupt/failures/{name}.json"))
        assert record["error"] in ("corrupt_image", "unknown_format") and record["message"] and record["attempts"] == 1
    run = json.loads(read(client, "batch-job", "corrupt/run.json"))
    assert run["counts"]["complete"] == 2 and run["counts"]["failed"] == 2
    assert {f["id"] for f in run["failures"]} == set(result.failed)
    # Repair one input: the re-run processes only that item and removes its stale failure record.
    (tmp_path / "images" / "truncated.png").write_bytes(good)
    again = run_batch(options)
    assert again.processed == 1 and set(again.failed) == {noise}
    names = set(objects(client, "batch-job", "corrupt"))
    assert f"failures/{truncated}.json" not in names and f"items/{truncated}/_complete.json" in names
    assert json.loads(read(client, "batch-job", f"corrupt/failures/{noise}.json"))["attempts"] == 2
    run = json.loads(read(client, "batch-job", "corrupt/run.json"))
    assert run["counts"]["complete"] == 3 and run["counts"]["failed"] == 1


def test_s3_source_prefix_with_index(ddsm_data, model_store, s3, minio_server, tmp_path):
    rows = subset(ddsm_data, "ddsm", 2, tmp_path)
    client = minio_server.client()
    client.make_bucket("batch-inputs")
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        client.fput_object("batch-inputs", f"set/{path.relative_to(tmp_path).as_posix()}", str(path))
    result = run_batch(RunOptions(model="ddsm", archive=model_store / "ddsm.mar", input="s3://batch-inputs/set",
                                  output="s3://batch-job/from-s3", s3=s3, progress=False))
    assert result.exit_code == 0 and result.processed == 2 and result.merged
    ids = source_ids(client, "batch-job", "from-s3")
    contents = check_complete_items(client, "batch-job", "from-s3", {ids[r["path"]] for r in rows})
    for row in rows:  # truth and masks are matched by source key, while keys carry only the id
        item = json.loads(contents[ids[row["path"]]]["result.json"])["item"]
        assert "source_key" not in item and item["truth"] == int(row["label"]) and item["mask"] == "mask.png"


def test_mri_run_writes_volumes_on_the_model_grid(adni_data, model_store, s3, minio_server, tmp_path):
    rows = subset(adni_data, "adni", 3, tmp_path)
    result = run_batch(RunOptions(model="adni", archive=model_store / "adni.mar", input=str(tmp_path),
                                  output="s3://batch-job/mri", explain=("gradcam",), batch_size=2, s3=s3,
                                  progress=False))
    assert result.exit_code == 0 and result.processed == 3 and result.merged
    client = minio_server.client()
    ids = source_ids(client, "batch-job", "mri")
    contents = check_complete_items(client, "batch-job", "mri", {ids[r["path"]] for r in rows})
    for row in rows:
        item = contents[ids[row["path"]]]
        assert set(item) == {"result.json", "features.npz", "heatmaps/gradcam.nii.gz", "input.nii.gz", "mask.nii.gz"}
        result_json = json.loads(item["result.json"])
        assert result_json["item"]["truth"] == int(row["label"])
        assert result_json["item"]["case_id"].startswith("c") and row["subject_id"] not in item["result.json"].decode()
        assert "gradcam" in result_json["regions"]
        shown = nib.Nifti1Image.from_bytes(gzip.decompress(item["input.nii.gz"]))
        scan = nib.load(tmp_path / row["path"])
        assert shown.shape == scan.shape and np.allclose(shown.affine, scan.affine, atol=1e-3)
        assert shown.get_data_dtype() == np.uint8
        heatmap = nib.Nifti1Image.from_bytes(gzip.decompress(item["heatmaps/gradcam.nii.gz"]))
        assert heatmap.shape == scan.shape


def test_batch_and_online_results_are_identical(ddsm_run, adni_data, model_store, torchserve, s3, minio_server,
                                                tmp_path):
    client = minio_server.client()
    row = ddsm_run["rows"][0]
    batch = checked(read(client, "batch-job", f"full/items/{item_id(row['path'])}/result.json"), "batch_result")
    source = ddsm_run["args"][ddsm_run["args"].index("--input") + 1]
    with Client(torchserve.inference_url, key_file=torchserve.key_file, timeout=300, retries=0) as online:
        served = checked(online.predict("ddsm", f"{source}/{row['path']}", top_k=8, explain="cam"), "response")
        rows = subset(adni_data, "adni", 1, tmp_path)
        run_batch(RunOptions(model="adni", archive=model_store / "adni.mar", input=str(tmp_path),
                             output="s3://batch-job/online-adni", explain=("gradcam",), s3=s3, progress=False))
        served_mri = checked(online.predict("adni", tmp_path / rows[0]["path"], top_k=8, explain="gradcam"), "response")
    mri_id = source_ids(client, "batch-job", "online-adni")[rows[0]["path"]]
    batch_mri = checked(read(client, "batch-job", f"online-adni/items/{mri_id}/result.json"), "batch_result")
    for served_result, batch_result, prefix, method, suffix in (
            (served, batch, f"full/items/{item_id(row['path'])}", "cam", "png"),
            (served_mri, batch_mri, f"online-adni/items/{mri_id}", "gradcam", "nii.gz")):
        for field in ("model", "prediction", "target", "units", "input", "warnings", "regions"):
            assert served_result.get(field) == batch_result.get(field), field
        served_map = served_result["heatmaps"][method]
        stored = read(client, "batch-job", f"{prefix}/heatmaps/{method}.{suffix}")
        assert base64.b64decode(served_map["data"]) == stored
        assert served_map["scale"] == batch_result["heatmaps"][method]["scale"]


_KEYS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.lists(_KEYS, min_size=1, max_size=20, unique=True), st.lists(_KEYS, max_size=20, unique=True))
def test_item_ids_are_stable_when_files_are_added_and_carry_no_name(keys, added):
    pseudonyms = Pseudonyms(ID_KEY)
    ids = assign_ids(keys, pseudonyms)
    more = assign_ids(list(dict.fromkeys(added + keys)), pseudonyms)
    assert {k: more[k] for k in keys} == ids  # adding files never changes another item's id
    assert assign_ids(list(reversed(keys)), pseudonyms) == ids  # nor does the order
    for item in ids.values():
        assert len(item) == 21 and item[0] == "i" and all(c in "0123456789abcdef" for c in item[1:])
    assert assign_ids(keys, Pseudonyms(b"another-key-0123456789")) != ids  # keyed: not a plain hash


def test_id_clash_is_refused():
    class Clashing(Pseudonyms):
        def item_id(self, source_key: str) -> str:
            return "i0"

    with pytest.raises(SourceError, match="same item id"):
        assign_ids(["a", "b"], Clashing(ID_KEY))


def test_identifying_file_names_never_reach_keys_json_or_output(ddsm_data, model_store, s3, minio_server, tmp_path):
    rows = subset(ddsm_data, "ddsm", 2, tmp_path)
    for row, name in zip(rows, ("MRN123_DOE_JANE", "MRN456_ROE_RICHARD")):
        (tmp_path / row["path"]).rename(tmp_path / "images" / f"{name}.png")
        row["path"], row["case_id"] = f"images/{name}.png", name.split("_")[0]
    write_index(tmp_path / "images.csv", list(rows[0]), rows)
    env = env_file(minio_server, tmp_path / "minio.env")
    done = cli("run", "--model", "ddsm", "--archive", str(model_store / "ddsm.mar"), "--input", str(tmp_path),
               "--output", "s3://batch-job/names", "--s3-env", str(env), "--no-progress")
    assert done.returncode == 0, done.stderr
    client = minio_server.client()
    assert_no_source_names(client, "batch-job", "names", [r["path"] for r in rows])
    for secret in ("MRN123", "MRN456", "DOE_JANE", "ROE_RICHARD"):
        assert secret not in done.stdout + done.stderr
        for key in objects(client, "batch-job", "names"):
            assert secret not in key
            if not key.startswith("private/") and key.endswith(".json"):
                assert secret not in read(client, "batch-job", f"names/{key}").decode(), key
    # the one place that maps ids back: private/sources.json (source keys and case ids)
    private = json.loads(read(client, "batch-job", "names/private/sources.json"))
    assert sorted(private["items"].values()) == sorted(r["path"] for r in rows)
    assert sorted(private["cases"].values()) == ["MRN123", "MRN456"]


def test_archive_extraction_refuses_zip_slip(tmp_path):
    import zipfile

    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ArchiveError, match="unsafe member"):
        safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_run_into_a_prefix_with_older_file_named_items_is_refused(ddsm_small, model_store, s3, minio_server):
    client = minio_server.client()
    if not client.bucket_exists("batch-job"):
        client.make_bucket("batch-job")
    client.put_object("batch-job", "legacy/items/images_C0001_LEFT_CC.png/_complete.json", io.BytesIO(b"{}"), 2)
    with pytest.raises(PseudonymError, match="made before pseudonymous ids"):
        run_batch(RunOptions(model="ddsm", archive=model_store / "ddsm.mar", input=str(ddsm_small[0]),
                             output="s3://batch-job/legacy", s3=s3, progress=False))
    assert not any(k.startswith("private/") for k in objects(client, "batch-job", "legacy"))
