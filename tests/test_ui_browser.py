"""End to end in a real browser: `streamlit run ui/app.py`, annotate a unit, reload, find the annotation.

Debian's chromium driven by PyPI playwright (its own browser download cannot work here); the UI
reads a run written by the batch job from the real MinIO and writes the annotation there.
"""

from __future__ import annotations

import shutil

import pytest

from devstack.services import StreamlitServer
from tests.test_ui_app import BUCKET, write_ui_runs
from ui.annotations import AnnotationStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 90_000

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (make setup installs it)")


@pytest.fixture
def ui_server(storage_users, model_store, ddsm_data, adni_data, tmp_path):
    env = write_ui_runs(storage_users, model_store, ddsm_data, adni_data, tmp_path / "inputs")
    server = StreamlitServer(workdir=tmp_path / "streamlit", env=env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def sign_in(page, name: str) -> None:
    box = page.get_by_label("Annotator name")
    box.wait_for(timeout=WAIT_MS)
    box.fill(name)
    box.press("Enter")


def open_units(page, url: str, name: str) -> None:
    page.goto(f"{url}/units")
    sign_in(page, name)
    page.get_by_text("Save annotation").wait_for(timeout=WAIT_MS)


def test_annotate_reload_and_find_it(ui_server, storage_users, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            open_units(page, ui_server.url, "Browser Reader")
            heading = page.get_by_role("heading", name="Annotate unit").first
            unit = int(heading.inner_text().split()[-1])
            page.get_by_text("spiculated", exact=True).click()
            page.get_by_label("Description (free text; no patient identifiers)").fill("seen in the browser")
            page.get_by_text("Save annotation").click()
            page.get_by_text("Saved: recognisable").wait_for(timeout=WAIT_MS)

            page.reload()  # a new session: everything shown next comes from storage
            open_units(page, ui_server.url, "Browser Reader")
            page.get_by_text("Your previous answer").wait_for(timeout=WAIT_MS)
            assert page.get_by_role("checkbox", name="spiculated").is_checked()
            assert not page.get_by_role("checkbox", name="obscured").is_checked()
            assert page.get_by_label("Description (free text; no patient identifiers)").input_value() == \
                "seen in the browser"
            page.get_by_text("Save annotation").scroll_into_view_if_needed()  # the prefilled form in the shot
            shot = tmp_path / "units-annotated.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

    store = AnnotationStore(storage_users["ui"].client(), BUCKET, "annotations")
    progress = store.progress("ddsm", next(iter(_versions(store))))
    assert "demo-browser-reader" in progress[unit]


def _versions(store: AnnotationStore) -> list[str]:
    objects = store.client.list_objects(BUCKET, prefix="annotations/ddsm/")
    return [o.object_name.rstrip("/").rsplit("/", 1)[-1] for o in objects if o.is_dir]
