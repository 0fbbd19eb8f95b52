"""``streamlit run ui/app.py``: identity in the sidebar, then one of the pages in ui/views/.

Kept thin on purpose: every page is its own script (``st.navigation`` needs a folder not named
``pages/``), and all logic lives in importable modules under ``ui/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run ui/app.py` puts ui/ on the path, not the repository
    sys.path.insert(0, str(ROOT))

import streamlit as st

from ui import identity

st.set_page_config(page_title="MedXplain", page_icon=":material/radiology:", layout="wide")
st.session_state["annotator"] = identity.require_identity()
HERE = Path(__file__).parent
pages = [
    st.Page(HERE / "views" / "cases.py", title="Cases", icon=":material/folder_open:", default=True),
    st.Page(HERE / "views" / "units.py", title="Units", icon=":material/grid_view:"),
    st.Page(HERE / "views" / "similar.py", title="Similar", icon=":material/image_search:"),
    st.Page(HERE / "views" / "analyse.py", title="Analyse", icon=":material/upload_file:"),
]
st.sidebar.caption("Not a medical device. Demo models are trained on synthetic data.")
st.navigation(pages).run()
