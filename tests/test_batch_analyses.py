"""Run-level analyses (batch.analyses): hand-built records with known answers, and records from the real engine."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from batch.analyses import SUMMARY_KEY, SimilarityIndex, build_run_outputs
from batch.analyses.embeddings import load_npy
from batch.records import ItemRecord, ModelInfo
from medxplain_contract.encodings import decode_2d, decode_3d
from medxplain_engine.engine import Engine, EngineRequest
from medxplain_models.ddsm import PATCH_SIZE

DDSM_CLASSES = ["normal", "benign", "malignant"]
ADNI_CLASSES = ["CN", "AD"]


# --- hand-built records ----------------------------------------------------------------------------

def _record(item_id: str, case_id: str, truth: int | None, predicted: int, features: dict,
            probabilities: list[float] | None = None, heatmaps: dict | None = None, mask=None,
            regions: dict | None = None, names=DDSM_CLASSES) -> ItemRecord:
    probabilities = probabilities or [float(c == predicted) for c in range(len(names))]
    result = {"prediction": {"label": names[predicted], "label_index": predicted,
                             "probabilities": dict(zip(names, probabilities))},
              "target": {"label": names[predicted], "index": predicted},
              "item": {"id": item_id, "source_key": f"{item_id}.png", "case_id": case_id, "truth": truth}}
    if heatmaps:
        result["heatmaps"] = {m: {"encoding": "stored"} for m in heatmaps}
    if regions:
        result["regions"] = regions
    return ItemRecord(item_id, result, features, load_heatmap=lambda m: heatmaps[m], load_mask=lambda: mask)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def _ddsm_model(units: int, rng: np.random.Generator) -> ModelInfo:
    return ModelInfo("ddsm", "ddsm", "1.0", DDSM_CLASSES, rng.normal(size=(3, units)).astype(np.float32), np.zeros(3))


def test_similarity_planted_duplicates_and_case_exclusion():
    rng = np.random.default_rng(0)
    n, dim = 300, 64
    emb = _unit(rng.normal(size=(n, dim)))
    cases = [f"C{i // 3:03d}" for i in range(n)]  # three views per case
    # Plant: item 3i+0 of cases 0..19 gets a near-duplicate in another case (item 150 + 3i) and an even
    # closer one in its own case (item 3i+1), which must never be returned.
    for i in range(20):
        a = 3 * i
        emb[150 + 3 * i] = _unit(emb[a] + 0.02 * rng.normal(size=dim))
        emb[a + 1] = _unit(emb[a] + 0.001 * rng.normal(size=dim))
    truth = [i % 3 if i % 5 else None for i in range(n)]
    records = [_record(f"item{i:04d}", cases[i], truth[i], (i + 1) % 3, {"embedding": emb[i]}) for i in range(n)]
    out = build_run_outputs(records, ModelInfo("ddsm", "ddsm", "1.0", DDSM_CLASSES), neighbours=20)

    assert json.loads(out["index/ids.json"]) == [r.item_id for r in records]
    np.testing.assert_array_equal(load_npy(out["index/embeddings.npy"]), emb)
    index = SimilarityIndex.from_objects(out["index/similarity.json"], out["index/embeddings.npy"], out["index/ids.json"])
    full = emb @ emb.T
    for i in range(20):
        hits = index.neighbours(f"item{3 * i:04d}")
        assert hits[0].item_id == f"item{150 + 3 * i:04d}"
        assert hits[0].case_id == cases[150 + 3 * i]
    for row in (0, 7, 151, 299):
        hits = index.neighbours(f"item{row:04d}", k=20)
        assert len(hits) == 20
        assert all(h.case_id != cases[row] for h in hits)
        # Independent brute force: all other-case items sorted by cosine.
        others = [j for j in range(n) if cases[j] != cases[row]]
        expected = sorted(others, key=lambda j: -full[row, j])[:20]
        assert [h.item_id for h in hits] == [f"item{j:04d}" for j in expected]
        np.testing.assert_allclose([h.score for h in hits], full[row, expected], atol=1e-5)
        for h in hits:
            j = int(h.item_id[4:])
            assert h.truth == (None if truth[j] is None else DDSM_CLASSES[truth[j]])
            assert h.predicted == DDSM_CLASSES[(j + 1) % 3]
        # The query API agrees with the stored neighbours, and without exclusion finds the item itself.
        assert [h.item_id for h in index.query(emb[row] * 3.0, k=20, exclude_case=cases[row])] == [h.item_id for h in hits]
        assert index.query(emb[row], k=1)[0].item_id == f"item{row:04d}"
    # More neighbours than stored: computed from the matrix, still excluding the case.
    many = index.neighbours("item0000", k=50)
    assert len(many) == 50 and all(h.case_id != "C000" for h in many)
    assert [h.score for h in many] == sorted((h.score for h in many), reverse=True)
    # similarity.json alone serves the stored neighbours.
    assert SimilarityIndex.from_objects(out["index/similarity.json"]).neighbours("item0003")[0].item_id == "item0153"


def _ddsm_features(rng: np.random.Generator, units: int, map_shape: tuple[int, int], cell: float) -> dict:
    pooled = rng.gamma(2.0, 1.0, size=units).astype(np.float32)
    peak = np.stack([rng.integers(0, map_shape[0], units), rng.integers(0, map_shape[1], units)], axis=1).astype(np.int32)
    return {"pooled": pooled, "peak": peak, "map_shape": np.array(map_shape), "cell_size": np.array([cell, cell]),
            "peak_maps": rng.normal(size=(units, 7, 7)).astype(np.float16), "embedding": _unit(pooled)}


def test_unit_atlas_sorted_boxes_inside_and_maps():
    rng = np.random.default_rng(1)
    units, n, top_n = 16, 40, 10
    shapes = [(44, 29), (29, 44), (8, 8)]
    records = []
    for i in range(n):
        shape = shapes[i % 3]
        records.append(_record(f"img{i:03d}", f"case{i // 2}", i % 3, i % 3,
                               _ddsm_features(rng, units, shape, 227 / 7 if shape == (8, 8) else 32.0)))
    out = build_run_outputs(records, _ddsm_model(units, rng), atlas_top_n=top_n)
    pooled = np.stack([r.features["pooled"] for r in records])
    assert sorted(k for k in out if k.startswith("units/0")) == [f"units/{u:04d}.json" for u in range(units)]
    for u in range(units):
        atlas = json.loads(out[f"units/{u:04d}.json"])
        acts = [p["activation"] for p in atlas["patches"]]
        assert len(acts) == top_n
        np.testing.assert_allclose(acts, np.sort(pooled[:, u])[::-1][:top_n], rtol=1e-5)
        for p in atlas["patches"]:
            feats = records[int(p["item_id"][3:])].features
            height, width = np.round(feats["map_shape"] * feats["cell_size"])
            y0, x0, y1, x1 = p["box"]
            assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
            assert y1 - y0 <= PATCH_SIZE and x1 - x0 <= PATCH_SIZE
            centre = (feats["peak"][u] + 0.5) * feats["cell_size"]
            assert y0 <= centre[0] <= y1 and x0 <= centre[1] <= x1
            # Unclipped boxes are exactly one patch wide.
            if PATCH_SIZE / 2 <= centre[0] <= height - PATCH_SIZE / 2:
                assert y1 - y0 == PATCH_SIZE
            np.testing.assert_allclose(p["map"], feats["peak_maps"][u].astype(np.float32), atol=1e-3)


def test_unit_rankings_known_contributions():
    rng = np.random.default_rng(2)
    units = 32
    weight = np.full((3, units), 0.01, np.float32)
    weight[1, :8] = 1.0  # benign: units 0..7 dominate every image
    weight[2, 8:16] = 2.0 ** np.arange(8, 0, -1)  # malignant: units 8..15, in this order
    model = ModelInfo("ddsm", "ddsm", "1.0", DDSM_CLASSES, weight, np.zeros(3))
    records = []
    for i in range(30):
        feats = _ddsm_features(rng, units, (10, 10), 32.0)
        feats["pooled"] = (1.0 + rng.random(units)).astype(np.float32)
        truth = None if i >= 24 else i % 3  # the last six have no truth: counted under their prediction
        records.append(_record(f"r{i:02d}", f"c{i}", truth, (i + 1) % 3, feats))
    ranks = json.loads(build_run_outputs(records, model)["units/rankings.json"])
    pooled = np.stack([r.features["pooled"] for r in records])
    groups = [i % 3 if i < 24 else (i + 1) % 3 for i in range(30)]
    assert ranks["class_source"] == "mixed"
    for c, name in enumerate(DDSM_CLASSES):
        members = [i for i in range(30) if groups[i] == c]
        entry = ranks["classes"][name]
        assert entry["images"] == len(members)
        assert entry["class_source_counts"] == {"truth": sum(i < 24 for i in members),
                                                "predicted": sum(i >= 24 for i in members)}
        mean = (pooled[members] * weight[c]).mean(axis=0)
        np.testing.assert_allclose([u["mean_contribution"] for u in entry["mean_contribution"]],
                                   np.sort(mean)[::-1], atol=1e-5)
        assert entry["mean_contribution"][0]["unit"] == int(np.argmax(mean))
        counts = {u["unit"]: u["count"] for u in entry["top8_frequency"]}
        assert sum(counts.values()) == 8 * len(members)
    benign = {u["unit"]: u["count"] for u in ranks["classes"]["benign"]["top8_frequency"]}
    assert benign == {u: ranks["classes"]["benign"]["images"] for u in range(8)}
    malignant = ranks["classes"]["malignant"]["top8_frequency"]
    assert {u["unit"] for u in malignant} == set(range(8, 16))
    assert [u["unit"] for u in ranks["classes"]["malignant"]["mean_contribution"][:2]] == [8, 9]
    assert set(range(16)) <= set(ranks["shortlist"])


def _auc_by_ranks(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC by counting pairs (independent of scikit-learn)."""
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def test_quality_report_known_predictions_and_pointing():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 60)
    predicted = np.where(rng.random(60) < 0.7, truth, (truth + 1) % 3)
    mask = np.zeros((50, 40), bool)
    mask[10:20, 10:20] = True
    records = []
    for i in range(60):
        probs = rng.dirichlet(np.ones(3))
        probs = np.roll(np.sort(probs), predicted[i] - 2).tolist()  # the predicted class is the largest
        heatmap = np.zeros((50, 40), np.float32)
        if i % 2:  # odd items peak inside the lesion, even items 30 px outside (beyond the 15 px tolerance)
            heatmap[15, 15] = 1.0
        else:
            heatmap[49, 39] = 1.0
        has_mask = truth[i] > 0
        records.append(_record(f"m{i:02d}", f"c{i}", int(truth[i]), int(predicted[i]), {"embedding": _unit(rng.normal(size=8))},
                               probs, {"cam": heatmap}, mask if has_mask else np.zeros_like(mask)))
    records.append(_record("unlabelled", "cx", None, 0, {"embedding": _unit(rng.normal(size=8))}))
    out = build_run_outputs(records, _ddsm_model(8, rng))
    report = json.loads(out["report.json"])
    cls = report["classification"]
    assert cls["items"] == 60 and report["items_with_truth"] == 60 and report["items"] == 61
    expected = np.zeros((3, 3), int)
    for t, p in zip(truth, predicted):
        expected[t, p] += 1
    assert cls["confusion_matrix"]["counts"] == expected.tolist()
    assert cls["accuracy"] == pytest.approx(float((truth == predicted).mean()))
    probs = np.array([[r.result["prediction"]["probabilities"][n] for n in DDSM_CLASSES] for r in records[:60]])
    for c, name in enumerate(DDSM_CLASSES):
        assert cls["auc_one_vs_rest"][name] == pytest.approx(_auc_by_ranks(truth == c, probs[:, c]))
    cam = report["explanations"]["methods"]["cam"]
    lesion = [i for i in range(60) if truth[i] > 0]
    assert cam["items"] == len(lesion)
    assert cam["pointing_game"] == pytest.approx(np.mean([i % 2 for i in lesion]))
    assert cam["mass_accuracy"] == pytest.approx(np.mean([i % 2 for i in lesion]))
    assert report["explanations"]["tolerance"] == 15
    assert report["explanations"]["chance"]["mass_accuracy"] == pytest.approx(mask.mean())


def test_mri_mean_maps_equal_numpy_mean_and_region_ranks():
    rng = np.random.default_rng(4)
    shape, affine = (6, 7, 5), np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-6, -7, -5]
    model = ModelInfo("adni", "adni", "1.0", ADNI_CLASSES, grid_affine=affine)
    maps, regions, groups, records = [], [], [], []
    for i in range(9):
        hm = {"gradcam": rng.random(shape).astype(np.float32), "sensitivity": rng.random(shape).astype(np.float32)}
        table = {m: [{"index": r, "name": f"R{r}", "hemisphere": "L", "voxels": 10 + r,
                      "sum": float(rng.random() * 10), "per_voxel": float(rng.random()), "rank": 0} for r in (1, 2, 3)]
                 for m in hm}
        truth = None if i == 8 else i % 2
        predicted = 1 if i == 8 else (i + i // 4) % 2
        maps.append(hm)
        regions.append(table)
        groups.append(predicted if truth is None else truth)
        records.append(_record(f"s{i}", f"p{i}", truth, predicted, {"embedding": _unit(rng.normal(size=4)),
                                                                 "pooled": rng.random(4).astype(np.float32)},
                               heatmaps=hm, regions=table, names=ADNI_CLASSES))
    out = build_run_outputs(records, model)
    assert not any(k.startswith("units/") for k in out)
    summary = json.loads(out["mri/summary.json"])
    for c, name in enumerate(ADNI_CLASSES):
        members = [i for i in range(9) if groups[i] == c]
        assert summary["classes"][name]["subjects"] == len(members)
        for method in ("gradcam", "sensitivity"):
            image = nib.Nifti1Image.from_bytes(gzip.decompress(out[f"mri/mean_{name}_{method}.nii.gz"]))
            np.testing.assert_allclose(image.get_fdata(), np.mean([maps[i][method] for i in members], axis=0), atol=1e-6)
            np.testing.assert_array_equal(image.affine, affine)
            table = summary["classes"][name]["methods"][method]["regions"]
            mean_pv = {r: np.mean([next(x["per_voxel"] for x in regions[i][method] if x["index"] == r) for i in members])
                       for r in (1, 2, 3)}
            mean_sum = {r: np.mean([next(x["sum"] for x in regions[i][method] if x["index"] == r) for i in members])
                        for r in (1, 2, 3)}
            assert [row["index"] for row in table] == sorted(mean_pv, key=lambda r: -mean_pv[r])
            for row in table:
                assert row["mean_per_voxel"] == pytest.approx(mean_pv[row["index"]], abs=1e-7)
                assert row["rank_sum"] == 1 + sum(v > mean_sum[row["index"]] for v in mean_sum.values())
    assert summary["classes"]["AD"]["class_source_counts"] == {"truth": 4, "predicted": 1}
    assert "units" in json.loads(out[SUMMARY_KEY])["skipped"]


def test_non_finite_values_become_null():
    from batch.analyses.common import dumps
    assert json.loads(dumps({"a": [1.0, float("nan")], "b": float("inf")})) == {"a": [1.0, None], "b": None}


def test_empty_run():
    out = build_run_outputs([], ModelInfo("ddsm", "ddsm", "1.0", DDSM_CLASSES))
    assert set(out) == {SUMMARY_KEY}
    assert json.loads(out[SUMMARY_KEY])["items"] == 0


# --- records from the real engine ------------------------------------------------------------------

def _engine_records(engine: Engine, items: list[dict], explain: list[str]) -> list[ItemRecord]:
    """What the job reads back from storage, built in memory from the engine's own outputs."""
    outputs = engine.run_prepared([engine.prepare_isolated(EngineRequest(it["payload"], {"explain": explain}))
                                   for it in items], with_features=True)
    records = []
    for it, out in zip(items, outputs):
        assert not isinstance(out, Exception), out
        result, feats = out.response, out.features
        heatmaps = {m: e for m, e in result.get("heatmaps", {}).items()}
        decode = ((lambda e: decode_3d(e).get_fdata(dtype=np.float32)) if engine.kind == "adni" else decode_2d)
        features = {"pooled": feats.pooled, "peak": feats.peak, "map_shape": np.array(feats.map_shape),
                    "cell_size": np.array(feats.cell_size), "embedding": feats.embedding}
        if feats.peak_maps is not None:
            features["peak_maps"] = feats.peak_maps
        result["item"] = {"id": it["id"], "source_key": it["id"], "case_id": it["case"], "truth": it["truth"]}
        records.append(ItemRecord(it["id"], result, features,
                                  load_heatmap=lambda m, h=heatmaps, d=decode: d(h[m]),
                                  load_mask=lambda m=it["mask"]: m))
        records[-1].display_shape = feats.display.shape  # for the test's box check only
    return records


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ddsm_run_from_real_engine(ddsm_bundle, ddsm_data):
    engine = Engine.from_model_dir(ddsm_bundle[0])
    rows = _csv(ddsm_data / "images.csv")
    rows = [r for r in rows if int(r["label"]) > 0][:4] + [r for r in rows if int(r["label"]) == 0][:2]
    items = [{"id": r["image_id"], "case": r["case_id"], "truth": int(r["label"]),
              "payload": (ddsm_data / r["path"]).read_bytes(),
              "mask": np.asarray(Image.open(ddsm_data / r["mask_path"])) > 0} for r in rows]
    # Two lesion patches cut from the first image (patch mode: a different map shape in the same run).
    image = np.asarray(Image.open(io.BytesIO(items[0]["payload"])))
    for k, (y, x) in enumerate(((0, 0), (100, 150))):
        buf = io.BytesIO()
        Image.fromarray(image[y:y + PATCH_SIZE, x:x + PATCH_SIZE]).save(buf, format="PNG")
        items.append({"id": f"patch{k}", "case": items[0]["case"], "truth": None, "payload": buf.getvalue(),
                      "mask": None})
    records = _engine_records(engine, items, ["cam"])
    model = ModelInfo("ddsm", engine.bundle.name, engine.bundle.version, engine.bundle.class_names,
                      engine.model.fc.weight.detach().numpy(), engine.model.fc.bias.detach().numpy())
    out = build_run_outputs(records, model, atlas_top_n=5, neighbours=3)

    units = engine.model.num_units
    assert {"index/ids.json", "index/embeddings.npy", "index/similarity.json", "units/rankings.json",
            "report.json", SUMMARY_KEY} <= set(out)
    assert sum(k.startswith("units/0") for k in out) == units
    by_id = {r.item_id: r for r in records}
    for u in (0, units // 2, units - 1):
        atlas = json.loads(out[f"units/{u:04d}.json"])
        assert len(atlas["patches"]) == 5
        for p in atlas["patches"]:
            record = by_id[p["item_id"]]
            height, width = record.display_shape  # the analysed image = input.png
            y0, x0, y1, x1 = p["box"]
            assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
            assert p["activation"] == pytest.approx(float(record.features["pooled"][u]), rel=1e-5)
    # The engine's own ranked units agree with the atlas's activations and the rankings' contributions.
    first = records[0]
    for unit in first.result["units"]:
        assert unit["activation"] == pytest.approx(float(first.features["pooled"][unit["unit"]]), rel=1e-4)
    index = SimilarityIndex.from_objects(out["index/similarity.json"], out["index/embeddings.npy"])
    hits = index.neighbours(records[0].item_id, k=3)
    assert hits and all(h.case_id != records[0].case_id for h in hits)
    assert all(h.item_id not in ("patch0", "patch1") for h in hits)  # same case as the first image
    report = json.loads(out["report.json"])
    assert report["classification"]["items"] == 6
    assert sum(map(sum, report["classification"]["confusion_matrix"]["counts"])) == 6
    cam = report["explanations"]["methods"]["cam"]
    assert cam["items"] == sum(bool(it["mask"].any()) for it in items[:6] if it["truth"] > 0)
    assert 0.0 <= cam["pointing_game"] <= 1.0
    image_auc = report["classification"]["auc_one_vs_rest_image_score"]  # full images only: class-map maxima
    assert set(image_auc) == set(engine.bundle.class_names)
    rankings = json.loads(out["units/rankings.json"])
    assert sum(c["images"] for c in rankings["classes"].values()) == len(records)


def test_adni_run_from_real_engine(adni_bundle, adni_data):
    engine = Engine.from_model_dir(adni_bundle[0])
    rows = _csv(adni_data / "subjects.csv")
    rows = [r for r in rows if int(r["label"]) == 1][:2] + [r for r in rows if int(r["label"]) == 0][:2]
    items = [{"id": r["subject_id"], "case": r["subject_id"], "truth": int(r["label"]),
              "payload": (adni_data / r["path"]).read_bytes(),
              "mask": np.asarray(nib.load(adni_data / r["mask_path"]).dataobj) > 0} for r in rows]
    records = _engine_records(engine, items, ["gradcam", "sensitivity"])
    model = ModelInfo("adni", engine.bundle.name, engine.bundle.version, engine.bundle.class_names,
                      grid_affine=engine.bundle.preprocessing.affine)
    out = build_run_outputs(records, model, neighbours=2)
    summary = json.loads(out["mri/summary.json"])
    for name in ("AD", "CN"):
        members = [r for r in records if engine.bundle.class_names[r.truth] == name]
        assert summary["classes"][name]["subjects"] == len(members) == 2
        for method in ("gradcam", "sensitivity"):
            image = nib.Nifti1Image.from_bytes(gzip.decompress(out[f"mri/mean_{name}_{method}.nii.gz"]))
            assert image.shape == engine.bundle.preprocessing.shape
            np.testing.assert_allclose(image.get_fdata(), np.mean([r.load_heatmap(method) for r in members], axis=0),
                                       rtol=1e-5, atol=1e-6)
            regions = summary["classes"][name]["methods"][method]["regions"]
            assert len(regions) == len(records[0].result["regions"][method])
            assert sorted(r["rank_sum"] for r in regions) == list(range(1, len(regions) + 1))
    report = json.loads(out["report.json"])
    assert report["classification"]["items"] == 4
    assert set(report["explanations"]["methods"]) == {"gradcam", "sensitivity"}
    assert report["explanations"]["methods"]["gradcam"]["items"] == sum(bool(it["mask"].any()) for it in items)
    assert "units" in json.loads(out[SUMMARY_KEY])["skipped"]
    assert np.asarray(load_npy(out["index/embeddings.npy"])).shape == (4, engine.model.num_units)


def test_mri_mean_maps_take_the_heatmaps_grid_and_never_an_identity():
    rng = np.random.default_rng(5)
    shape = (4, 5, 3)
    sent = np.diag([2.0, 2.0, 2.0, 1.0])
    sent[:3, 3] = [-4, -5, -3]

    def records(affines):
        out = []
        for i, affine in enumerate(affines):
            hm = {"gradcam": rng.random(shape).astype(np.float32)}
            record = _record(f"s{i}", f"p{i}", i % 2, i % 2, {"embedding": _unit(rng.normal(size=4))},
                             heatmaps=hm, names=ADNI_CLASSES)
            if affine is not None:
                record.result["input"] = {"format": "nifti", "shape": list(shape), "resampled": True,
                                          "affine": affine.tolist()}
            out.append(record)
        return out

    model = ModelInfo("adni", "adni", "1.0", ADNI_CLASSES, grid_affine=np.diag([1.0, 1.0, 1.0, 1.0]) * 3)
    out = build_run_outputs(records([sent, sent]), model)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(out["mri/mean_CN_gradcam.nii.gz"]))
    np.testing.assert_allclose(image.affine, sent)  # the heatmaps' grid, not the model record's
    shifted = sent.copy()
    shifted[0, 3] += 10
    for recs, info, reason in ((records([sent, shifted]), model, "different grids"),
                               (records([None, None]), ModelInfo("adni", "adni", "1.0", ADNI_CLASSES),
                                "no affine is known")):
        out = build_run_outputs(recs, info)  # the rest of the run's analyses still land
        assert not any(key.startswith("mri/") for key in out), sorted(out)  # no mean map on a guessed grid
        assert reason in json.loads(out[SUMMARY_KEY])["skipped"]["mri"]
