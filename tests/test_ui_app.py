"""The Streamlit UI against the real MinIO with runs written by the batch job (AppTest, in-process).

Every page renders from real objects; filters change what is listed; an annotation saved through
the form is read back from storage and prefilled; concurrent saves from many threads all survive;
the consensus export goes into an archive whose engine then returns the experts' labels. The runs
are written with the batch user's credentials and the UI reads and writes with its own (see
devstack/iam.py); a broken login setup is an error page, and demo mode needs MEDXAI_UI_DEMO=1.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from medxplain_contract.storage import S3Config
from ui import agreement, lexicon
from ui.annotations import Annotation, AnnotationStore, safe_id
from ui.runs import Run

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "ui" / "app.py")
BUCKET = "ui-test"
TIMEOUT = 120


def subset(source: Path, target: Path, index: str, cases: int) -> Path:
    """A copy of a synthetic set restricted to its first ``cases`` cases/subjects (index CSV included)."""
    with open(source / index, newline="") as f:
        rows = list(csv.DictReader(f))
    case_of = (lambda r: r["case_id"]) if "case_id" in rows[0] else (lambda r: r["subject_id"])
    chosen = list(dict.fromkeys(case_of(r) for r in rows))[:cases]
    keep = [r for r in rows if case_of(r) in chosen]
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with open(target / index, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    for row in keep:
        for column in ("path", "mask_path"):
            if row.get(column):
                (target / row[column]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / row[column], target / row[column])
    return target


def s3_env(config: S3Config) -> dict[str, str]:
    return {"MEDXAI_S3_ENDPOINT": config.endpoint_url, "MEDXAI_S3_ACCESS_KEY": config.access_key,
            "MEDXAI_S3_SECRET_KEY": config.secret_key, "MEDXAI_UI_RUNS": f"s3://{BUCKET}/runs",
            "MEDXAI_UI_ANNOTATIONS": f"s3://{BUCKET}/annotations"}


def write_ui_runs(storage_users: dict[str, S3Config], model_store: Path, ddsm_data: Path, adni_data: Path,
                  work: Path) -> dict[str, str]:
    """One ddsm and one adni run written by the batch job as the batch user (a re-run is a no-op), and
    the UI's env: its own user, demo mode on (no OIDC provider in the tests)."""
    from batch.runner import RunOptions, run_batch

    env = {**s3_env(storage_users["ui"]), "MEDXAI_UI_DEMO": "1"}
    config = storage_users["batch"]
    jobs = (("ddsm", subset(ddsm_data, work / "ddsm-in", "images.csv", 3), ("cam",)),
            ("adni", subset(adni_data, work / "adni-in", "subjects.csv", 3), ("gradcam",)))
    for model, source, explain in jobs:
        result = run_batch(RunOptions(model=model, archive=model_store / f"{model}.mar", input=str(source),
                                      output=f"s3://{BUCKET}/runs/{model}", explain=explain, s3=config,
                                      progress=False, batch_size=4))
        assert result.exit_code == 0, result.summary_line()
    return env | {"_ddsm_source": str(jobs[0][1])}


@pytest.fixture(scope="session")
def ui_env(storage_users, model_store, ddsm_data, adni_data, tmp_path_factory) -> dict[str, str]:
    env = write_ui_runs(storage_users, model_store, ddsm_data, adni_data, tmp_path_factory.mktemp("ui-inputs"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def clear_streamlit_caches():
    """st.cache_* is process-wide: every AppTest starts from storage, not from the previous test."""
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def annotations(ui_env, storage_users) -> AnnotationStore:
    return AnnotationStore(storage_users["ui"].client(), BUCKET, "annotations")  # as the UI does


def app(name: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if name:
        at.text_input(key="annotator_name").input(name).run()
    return at


def open_page(at: AppTest, page: str, run_key: str | None = None, run: str | None = None) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    if run_key and run:
        at.selectbox(key=f"{run_key}_prefix").select(f"runs/{run}").run()
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def test_cases_page_lists_runs_and_filters(ui_env):
    at = app()
    no_errors(at)
    assert at.warning and "Demo mode" in at.warning[0].value  # no [auth] + MEDXAI_UI_DEMO=1: visible demo mode
    picker = at.selectbox(key="cases_run_prefix")
    assert sorted(o.split(" · ")[0] for o in picker.options) == ["runs/adni", "runs/ddsm"]
    picker.select("runs/ddsm").run()
    no_errors(at)
    table = at.dataframe[0].value
    assert len(table) == 12 and set(table["truth"]) <= {"normal", "benign", "malignant"}
    # items and cases are shown by their pseudonyms, never by source file name or index case id
    sources = [p.name.split(".")[0] for p in (Path(ui_env["_ddsm_source"]) / "images").glob("*.png")]
    assert len(sources) == 12 and all(i.startswith("i") and len(i) == 21 for i in table["item"])
    assert all(c.startswith("c") for c in table["case"])
    shown = " ".join(str(v) for v in table.to_numpy().ravel()) + at.selectbox(key="case_item").value
    assert not any(name in shown or name.split("_")[0] in shown for name in sources)
    assert f"{len(table)} of {len(table)} items" in captions(at)
    label = table["truth"].iloc[0]
    at.multiselect(key="filter_truth").select(label).run()
    filtered = at.dataframe[0].value
    assert 0 < len(filtered) <= len(table) and set(filtered["truth"]) == {label}
    at.multiselect(key="filter_truth").unselect(label).run()
    at.radio(key="filter_correct").set_value("incorrect").run()
    wrong = at.dataframe[0].value
    assert (wrong["truth"] != wrong["predicted"]).all()
    assert len(wrong) == int((table["truth"] != table["predicted"]).sum())
    at.radio(key="filter_correct").set_value("all").run()
    # one case: overlay controls, probabilities, top units
    at.selectbox(key="case_method").select("cam").run()
    at.slider(key="case_opacity").set_value(0.8).run()
    at.selectbox(key="case_cmap").select("jet").run()
    at.toggle(key="case_mask").set_value(True).run()  # ground-truth outline from the run's mask object
    no_errors(at)
    assert any("Top units" in h.value for h in at.subheader)
    units = at.dataframe[1].value
    assert len(units) == 8 and {"unit", "contribution", "concept labels"} <= set(units.columns)


def test_cases_page_mri_triplanar(ui_env):
    at = open_page(app(), "cases", "cases_run", "adni")
    no_errors(at)
    item = at.selectbox(key="case_item").value
    sliders = {s.key for s in at.slider}
    assert {f"tri_{item}_axial", f"tri_{item}_coronal", f"tri_{item}_sagittal"} <= sliders
    at.slider(key=f"tri_{item}_axial").set_value(10).run()
    no_errors(at)
    assert any("Region relevance" in h.value for h in at.subheader)
    assert not any("No region table" in c.value for c in at.caption)


def test_units_annotation_saved_read_back_and_prefilled(ui_env, annotations):
    at = open_page(app("Reader One"), "units", "units_run", "ddsm")
    no_errors(at)
    unit = at.selectbox(key="unit_pick").value
    assert at.dataframe[0].value["unit"].tolist()[0] == unit  # ranked list comes from units/rankings.json
    assert not any("No atlas entry" in i.value for i in at.info)  # top-activating patches from units/<unit>.json
    assert at.slider(key="unit_patches").value > 1
    at.selectbox(key=f"unit_full_{unit}").select(1).run()  # full image with the patch box on demand
    no_errors(at)
    me = "demo-reader-one"
    model, version = "ddsm", next(c.value for c in at.caption if "Annotations are kept" in c.value).split(" / ")[1]
    version = version.split("**")[0]
    k = f"ann_{model}_{version}_{unit}_{me}"
    at.radio(key=f"{k}_recognisable").set_value("yes")
    at.checkbox(key=f"{k}_mass.margin.spiculated").check()
    at.checkbox(key=f"{k}_calc.suspicious.fine_pleomorphic").check()
    at.text_area(key=f"{k}_text").input("spiculated mass border")
    at.select_slider(key=f"{k}_confidence").set_value(4)
    at.button[[b.label for b in at.button].index("Save annotation")].click().run()
    no_errors(at)
    assert at.success and "Saved" in at.success[0].value

    saved = annotations.latest(model, version, unit, me)
    assert saved is not None and saved.recognisable and saved.confidence == 4
    assert saved.concepts == ["mass.margin.spiculated", "calc.suspicious.fine_pleomorphic"]
    assert saved.free_text == "spiculated mass border" and saved.annotator_name == "Reader One"
    assert saved.authenticated is False and saved.context["identity"] == "demo"  # typed name, no login

    # a new session of the same annotator sees the answer prefilled; a second save keeps the first
    at2 = open_page(app("Reader One"), "units", "units_run", "ddsm")
    assert at2.checkbox(key=f"{k}_mass.margin.spiculated").value is True
    assert at2.checkbox(key=f"{k}_mass.shape.oval").value is False
    assert at2.text_area(key=f"{k}_text").value == "spiculated mass border"
    at2.checkbox(key=f"{k}_calc.suspicious.fine_pleomorphic").uncheck()
    at2.button[[b.label for b in at2.button].index("Save annotation")].click().run()
    history = annotations.history(model, version, unit, me)
    assert len(history) == 2 and history[0].concepts != history[1].concepts
    assert history[-1].concepts == ["mass.margin.spiculated"]


def test_concurrent_saves_all_survive(annotations):
    threads, per_thread, unit = 8, 5, 4242
    barrier = threading.Barrier(threads)
    keys: list[str] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                keys.append(annotations.save(Annotation(
                    model="concurrency", version_key="v1", unit=unit, annotator_id=f"reader-{n % 3}",
                    annotator_name=f"Reader {n % 3}", recognisable=bool(i % 2), concepts=["lymph_node.intramammary"],
                    free_text=f"thread {n} save {i}")))
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            errors.append(err)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert len(set(keys)) == threads * per_thread
    assert annotations.count("concurrency", "v1") == threads * per_thread
    texts = {a.free_text for r in range(3) for a in annotations.history("concurrency", "v1", unit, f"reader-{r}")}
    assert texts == {f"thread {n} save {i}" for n in range(threads) for i in range(per_thread)}
    assert set(annotations.latest_all("concurrency", "v1")[unit]) == {"reader-0", "reader-1", "reader-2"}


def test_agreement_view_and_consensus_export(ui_env, annotations, ddsm_bundle, tmp_path):
    cases = open_page(app(), "cases", "cases_run", "ddsm")
    first, second = (int(u) for u in cases.dataframe[1].value["unit"].iloc[:2])  # the first case's top units
    at = open_page(app("Reader One"), "units", "units_run", "ddsm")
    model, version = "ddsm", next(c.value for c in at.caption if "Annotations are kept" in c.value)
    version = version.split(" / ")[1].split("**")[0]
    for who, recognisable, concepts in (("a", True, ["mass.shape.irregular"]), ("b", True, ["mass.shape.irregular"]),
                                        ("c", False, [])):
        annotations.save(Annotation(model=model, version_key=version, unit=first, annotator_id=f"demo-{who}",
                                    annotator_name=who, recognisable=recognisable, concepts=concepts))
    at = open_page(app("Reader One"), "units", "units_run", "ddsm")
    no_errors(at)
    assert any("No answers of logged-in annotators" in i.value for i in at.info)  # demo answers left out
    at.toggle(key="agree_include_demo").set_value(True).run()
    no_errors(at)
    fleiss = next(m for m in at.metric if m.label == "Fleiss' kappa")
    assert fleiss.value != "n/a"
    latest = annotations.latest_all(model, version)
    assert agreement.consensus(latest, model, version)["units"] == {}  # default: authenticated answers only
    export = agreement.consensus(latest, model, version, include_demo=True)
    assert export["units"][str(first)]["labels"] == [lexicon.label("mass.shape.irregular")]
    assert export["answers"]["demo"] >= 3 and not export["answers"]["authenticated_only"]
    assert at.get("download_button")  # the export is offered as unit_labels.json

    # two logged-in readers label the second unit: only their answers make the default export
    for who in ("x", "y"):
        annotations.save(Annotation(model=model, version_key=version, unit=second, annotator_id=f"oidc-{who * 16}",
                                    annotator_name=who, recognisable=True, concepts=["calc.benign.skin"],
                                    authenticated=True))
    annotations.save(Annotation(model=model, version_key=version, unit=second, annotator_id="demo-oidc-forged",
                                annotator_name="oidc-forged", recognisable=False, authenticated=True))  # not an OIDC id
    latest = annotations.latest_all(model, version)
    trusted = agreement.consensus(latest, model, version)
    assert set(trusted["units"]) == {str(second)} and trusted["units"][str(second)]["annotators"] == 2
    assert trusted["answers"]["authenticated_only"] and trusted["answers"]["demo"] == 0
    assert trusted["answers"]["authenticated"] == 2 and trusted["answers"]["demo_left_out"] >= 4

    st.cache_data.clear()  # the Cases page shows the current consensus (demo answers too, in demo mode)
    cases = open_page(app(), "cases", "cases_run", "ddsm")
    row = cases.dataframe[1].value.iloc[0]
    assert row["current consensus"] == lexicon.label("mass.shape.irregular") and row["concept labels"] == "—"

    # the export goes into the next archive: demo answers only when explicitly included
    from medxplain_engine.engine import Engine
    from model_store.__main__ import main as model_store_main

    demo_file, trusted_file = tmp_path / "demo_labels.json", tmp_path / "unit_labels.json"
    demo_file.write_text(json.dumps(export))
    archive = ["archive", "--bundle", str(ddsm_bundle[0]), "--out", str(tmp_path / "store"), "--unit-labels"]
    assert model_store_main([*archive, str(demo_file)]) == 2 and not (tmp_path / "store").exists()
    assert model_store_main([*archive, str(demo_file), "--include-demo-answers"]) == 0
    trusted["units"] = {str(u): {"labels": ["test concept"]} for u in range(4096)}
    trusted_file.write_text(json.dumps(trusted))
    assert model_store_main([*archive, str(trusted_file)]) == 0
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "store" / "ddsm.mar") as zf:
        zf.extractall(unpacked)
    engine = Engine.from_model_dir(unpacked)
    from medxplain_engine.engine import EngineRequest

    patch = Image.fromarray((np.random.default_rng(0).random((227, 227)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    patch.save(buf, format="PNG")
    response = engine.run([EngineRequest(payload=buf.getvalue(), params={"top_k": 3})])[0]
    assert all(u["labels"] == ["test concept"] for u in response["units"])


def test_similar_page_case_query(ui_env, storage_users):
    at = open_page(app(), "similar", "similar_run", "ddsm")
    no_errors(at)
    item = at.selectbox(key="similar_item").value
    run = Run(storage_users["ui"].client(), BUCKET, "runs/ddsm")
    case_of = {i: run.result(i)["item"]["case_id"] for i in run.item_ids()}
    results = sorted((c.value for c in at.caption if c.value.startswith("#")), key=lambda v: int(v[1:].split()[0]))
    assert 0 < len(results) <= 20
    assert all("score" in r and "true:" in r and "predicted:" in r for r in results)
    shown = [r.split("\n")[1].strip() for r in results]
    assert all(case_of[i] != case_of[item] for i in shown)  # same case excluded
    assert len(shown) == sum(case_of[i] != case_of[item] for i in case_of)  # fewer than 20 items: all others
    scores = [float(r.split("score ")[1].split()[0]) for r in results]
    assert scores == sorted(scores, reverse=True)


def test_similar_upload_and_analyse_through_torchserve(ui_env, torchserve, ddsm_data, adni_data):
    os.environ["MEDXAI_TORCHSERVE_URL"] = torchserve.inference_url
    os.environ["MEDXAI_TORCHSERVE_KEY_FILE"] = str(torchserve.key_file)
    try:
        image = next((ddsm_data / "images").glob("*.png")).read_bytes()
        at = open_page(app(), "similar", "similar_run", "ddsm")
        at.radio(key="similar_source").set_value("an uploaded image").run()
        at.file_uploader(key="similar_upload").upload("query.png", image, "image/png").run()
        no_errors(at)
        results = [c.value for c in at.caption if c.value.startswith("#")]
        assert len(results) == 12  # every item of the run: an upload belongs to no case

        at = open_page(app(), "analyse")
        at.file_uploader(key="analyse_upload").upload("x.png", image, "image/png").run()
        at.button(key="analyse_go").click().run()
        no_errors(at)
        assert at.success and "Prediction:" in at.success[0].value
        assert len(at.dataframe[0].value) == 8

        # DICOM: analysed, and none of its (made-up) patient tags appears anywhere on the page
        import pydicom

        row = next(r for r in csv.DictReader(io.StringIO((ddsm_data / "images.csv").read_text())) if r.get("dicom_path"))
        dicom = (ddsm_data / row["dicom_path"]).read_bytes()
        tags = pydicom.dcmread(io.BytesIO(dicom))
        secrets = [str(v) for v in (tags.get("PatientName"), tags.get("PatientID")) if v]
        at.file_uploader(key="analyse_upload").upload("patient.dcm", dicom, "application/dicom").run()
        at.button(key="analyse_go").click().run()
        no_errors(at)
        assert at.success and "Prediction:" in at.success[0].value
        page_text = " ".join(str(e.value) for kind in ("markdown", "caption", "success", "warning", "info")
                             for e in getattr(at, kind)) + " ".join(d.value.to_string() for d in at.dataframe)
        assert secrets and not any(s in page_text for s in secrets)

        # NIfTI: the model is chosen from the file, tri-planar viewer and region chart
        volume = next((adni_data / "images").glob("*.nii.gz")).read_bytes()
        at.file_uploader(key="analyse_upload").upload("scan.nii.gz", volume, "application/gzip").run()
        assert at.selectbox(key="analyse_model_adni").value == "adni"
        at.button(key="analyse_go").click().run()
        no_errors(at)
        assert {"analyse_tri_axial", "analyse_tri_coronal", "analyse_tri_sagittal"} <= {s.key for s in at.slider}
        assert any("Region relevance" in h.value for h in at.subheader)

        at.file_uploader(key="analyse_upload").upload("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png").run()
        at.button(key="analyse_go").click().run()
        assert not at.exception
        assert at.error and "Cannot read this file" in at.error[0].value
    finally:
        os.environ.pop("MEDXAI_TORCHSERVE_URL")
        os.environ.pop("MEDXAI_TORCHSERVE_KEY_FILE")


def test_no_run_and_bad_settings_give_messages(ui_env, monkeypatch):
    monkeypatch.setenv("MEDXAI_UI_RUNS", f"s3://{BUCKET}/runs/none-here")
    at = app()
    no_errors(at)
    assert at.info and "No finished runs" in at.info[0].value
    st.cache_resource.clear()
    st.cache_data.clear()
    monkeypatch.setenv("MEDXAI_S3_ENDPOINT", "ftp://nowhere")
    at = app()
    assert not at.exception
    assert at.error and "Storage is not configured" in at.error[0].value


def test_kappa_matches_reference_values():
    from sklearn.metrics import cohen_kappa_score

    a = ["y", "n", "y", "y", "n", "y", "n", "n"]
    b = ["y", "n", "n", "y", "n", "y", "y", "n"]
    assert agreement.cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    # Fleiss (1971) style check: 4 subjects, 3 raters, hand-computed kappa = 1/3
    assert agreement.fleiss_kappa([["a", "a", "b"], ["a", "a", "a"], ["b", "b", "a"], ["b", "b", "b"]]) == \
        pytest.approx(1 / 3)
    assert safe_id("Dr. Ünïcode / Name") == "dr.-n-code-name"


AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
        "client_id": "medxplain", "client_secret": "cs-7f3a9e-not-for-pages",
        "server_metadata_url": "https://idp.example/.well-known/openid-configuration"}
READER = {"is_logged_in": True, "name": "Dr Reader", "email": "reader@hospital.example", "sub": "abc",
          "iss": "https://idp.example"}


def auth_app(auth: dict | None, user: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if auth is not None:
        at.secrets["auth"] = auth
    at.user = user or {"is_logged_in": False}
    return at.run()


def test_oidc_login_required_and_answers_marked_authenticated(ui_env, annotations):
    at = auth_app(AUTH)
    assert not at.exception
    assert any("log in" in i.value for i in at.info) and not at.text_input  # no demo name box, no page
    assert not at.title

    at = auth_app(AUTH, READER)
    no_errors(at)
    assert not at.warning  # no demo-mode banner
    assert any("Signed in as **Dr Reader**" in c.value for c in at.caption)
    me = at.session_state["annotator"]
    assert me.id.startswith("oidc-") and me.mode == "oidc"

    # an answer saved by the logged-in reader is stored as authenticated
    open_page(at, "units", "units_run", "ddsm")
    no_errors(at)
    unit = at.selectbox(key="unit_pick").value
    version = next(c.value for c in at.caption if "Annotations are kept" in c.value).split(" / ")[1].split("**")[0]
    at.radio(key=f"ann_ddsm_{version}_{unit}_{me.id}_recognisable").set_value("no")
    at.button[[b.label for b in at.button].index("Save annotation")].click().run()
    no_errors(at)
    saved = annotations.latest("ddsm", version, unit, me.id)
    assert saved is not None and saved.authenticated is True and saved.annotator_name == "Dr Reader"
    assert agreement.is_authenticated(saved)


@pytest.mark.parametrize(("change", "problem"), [
    ({"cookie_secret": ""}, "no cookie_secret"),
    ({"cookie_secret": "short"}, "shorter than 32"),
    ({"redirect_uri": "http://localhost:8501/callback"}, "/oauth2callback"),
    ({"server_metadata_url": "http://idp.example/.well-known/openid-configuration"}, "must use https"),
    ({"server_metadata_url": "https://idp.example/metadata"}, "not an OIDC discovery URL"),
    ({"client_id": None, "client_secret": None, "server_metadata_url": None}, "names no identity provider"),
    ({"client_secret": ""}, "missing client_secret"),
])
def test_broken_auth_is_an_error_page_never_demo_mode(change, problem, monkeypatch):
    monkeypatch.setenv("MEDXAI_UI_DEMO", "1")
    auth = {k: v for k, v in {**AUTH, **change}.items() if v is not None}
    at = auth_app(auth, READER)  # even a "logged-in" user and MEDXAI_UI_DEMO=1 get no further
    assert not at.exception
    assert at.error and "cannot work" in at.error[0].value and problem in at.error[0].value, at.error
    assert not at.text_input and not at.title and not at.warning and not at.button
    assert AUTH["client_secret"] not in at.error[0].value and "x" * 32 not in at.error[0].value  # names, not values


def test_authlib_missing_is_an_error_page(monkeypatch):
    monkeypatch.setitem(sys.modules, "authlib", None)  # what `import authlib` sees when it is not installed
    at = auth_app(AUTH, READER)
    assert at.error and "Authlib is not installed" in at.error[0].value and not at.title


def test_no_login_and_no_demo_flag_is_an_error_page(ui_env, monkeypatch):
    monkeypatch.delenv("MEDXAI_UI_DEMO")
    at = auth_app(None)
    assert not at.exception
    assert at.error and "No login is configured" in at.error[0].value and "MEDXAI_UI_DEMO=1" in at.error[0].value
    assert not at.text_input and not at.title
    monkeypatch.setenv("MEDXAI_UI_DEMO", "1")
    at = auth_app(None)
    no_errors(at)
    assert at.warning and "Demo mode" in at.warning[0].value
    assert at.text_input(key="annotator_name").label == "Annotator name"


def test_overlay_decodes_every_api_encoding_and_blends():
    from medxplain_contract.encodings import decode_map as decode_map_entry
    from medxplain_contract.encodings import encode_2d, encode_3d
    from ui.overlay import blend

    values = np.linspace(-1.5, 2.5, 60 * 40, dtype=np.float32).reshape(60, 40)
    assert np.allclose(decode_map_entry(encode_2d(values, "png")), values, atol=4.0 / 255 + 1e-6)
    assert np.allclose(decode_map_entry(encode_2d(values, "float16")), values, atol=2e-3)
    volume = np.random.default_rng(1).random((9, 11, 7)).astype(np.float32)
    assert np.allclose(decode_map_entry(encode_3d(volume, np.diag([2.0, 2.0, 2.0, 1.0]))), volume, atol=1 / 255 + 1e-6)
    grey = np.zeros((60, 40), np.uint8)
    rgb = blend(grey, values, alpha=1.0, cmap="jet")
    assert rgb.shape == (60, 40, 3) and rgb[-1].mean() > rgb[0].mean()  # hot end coloured, cold end left grey
    assert (blend(grey, values, alpha=0.0) == 0).all()
