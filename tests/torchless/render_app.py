"""Render every page of the Streamlit app with AppTest and print a JSON report (run it under sitecustomize.py).

``python tests/torchless/render_app.py RUN_PREFIX`` with the UI's ``MEDXAI_*`` settings in the environment:
opens Cases (on RUN_PREFIX), Units, Similar and Analyse as a demo-mode annotator and reports, per page,
the exceptions and error boxes Streamlit showed and how many tables and images it drew.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = ("cases", "units", "similar", "analyse")


def main(run_prefix: str) -> None:
    from streamlit.testing.v1 import AppTest

    report = {}
    for page in PAGES:
        at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=120)
        at.run()
        if page != "cases":
            at.switch_page(f"views/{page}.py").run()
        picker = [s for s in at.selectbox if s.key == f"{page}_run_prefix"]
        if picker:
            picker[0].select(run_prefix).run()
        report[page] = {"exceptions": [e.value for e in at.exception], "errors": [e.value for e in at.error],
                        "tables": len(at.dataframe), "images": len(at.get("imgs")),
                        "title": [t.value for t in at.title] + [h.value for h in at.header]}
    deadline = time.monotonic() + 60  # background imports (the app's warm-up thread) are part of the check
    for thread in threading.enumerate():
        if thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    report["torch_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "captum"))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1])
