"""Who is annotating: OIDC login (``st.login``) when ``[auth]`` is configured, else a visible demo mode.

In demo mode anyone can type any name, so the sidebar says so; annotations record the mode they
were made in, and the consensus export can be restricted to OIDC answers later if needed.
"""

from __future__ import annotations

import hashlib

import streamlit as st

from ui.annotations import Annotator, safe_id

NAME_KEY = "annotator_name"


def auth_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 -- no secrets.toml at all: Streamlit raises rather than answering False
        return False


def require_identity() -> Annotator | None:
    """Sidebar identity widget. With OIDC, stops the page until the user has logged in."""
    if auth_configured():
        if not st.user.is_logged_in:
            st.info("Please log in to use MedXplain.")
            st.button("Log in", on_click=st.login, key="login")
            st.stop()
        user = st.user.to_dict()
        subject = f"{user.get('iss', '')}|{user.get('sub') or user.get('email') or user.get('name')}"
        name = str(user.get("name") or user.get("email") or "user")
        with st.sidebar:
            st.caption(f"Signed in as **{name}**")
            st.button("Log out", on_click=st.logout, key="logout")
        return Annotator("oidc-" + hashlib.sha256(subject.encode()).hexdigest()[:16], name, "oidc")
    with st.sidebar:
        st.warning("Demo mode: no login is configured. Annotations are attributed to the name typed here.",
                   icon="⚠️")
        name = st.text_input("Annotator name", key=NAME_KEY, max_chars=60, placeholder="e.g. reader-1").strip()
    if not name:
        return None
    return Annotator("demo-" + safe_id(name, 48), name, "demo")
