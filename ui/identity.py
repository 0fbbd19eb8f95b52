"""Who is annotating: OIDC login (``st.login``) when ``[auth]`` is configured; fails closed otherwise.

- ``[auth]`` present and valid: people log in; their annotations are marked ``authenticated``.
- ``[auth]`` present but broken (missing keys, a provider metadata URL that cannot be an OIDC
  discovery document, Authlib not installed, an unparsable secrets file): an error page. The UI never
  falls back to demo mode silently, because a login that quietly stops working would let anyone
  type any name.
- no ``[auth]``: demo mode only when explicitly enabled with ``MEDXAI_UI_DEMO=1`` (the devstack
  sets it for ``make serve`` / ``make demo``); else an error page saying how to configure either.

Demo answers are stored with ``authenticated: false``; the consensus export and
``python -m model_store archive --unit-labels`` leave them out unless explicitly included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from urllib.parse import urlparse

import streamlit as st

from ui.annotations import Annotator, safe_id
from ui.settings import demo_mode_enabled

NAME_KEY = "annotator_name"
PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class AuthConfigError(ValueError):
    """``[auth]`` is present but cannot work (the message names keys, never their values)."""


def _secure_url(value: object, what: str, local_http: bool = True) -> str:
    parsed = urlparse(str(value))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AuthConfigError(f"{what} is not an http(s) URL")
    if parsed.scheme == "http" and not (local_http and parsed.hostname in _LOCAL_HOSTS):
        raise AuthConfigError(f"{what} must use https (plain http only for localhost)")
    return parsed.path


def providers(auth: Mapping) -> dict[str, Mapping]:
    """provider name -> its section; ``default`` is the provider written directly under ``[auth]``."""
    named = {k: v for k, v in auth.items() if isinstance(v, Mapping)}
    if any(k in auth for k in PROVIDER_KEYS):
        named["default"] = auth
    return named


def check_auth(auth: Mapping) -> list[str]:
    """Provider names of a usable ``[auth]`` section; raises AuthConfigError with the first problem.

    Offline checks only (what Streamlit needs, and URL shapes); the provider is contacted at login.
    """
    try:
        import authlib  # noqa: F401 -- st.login needs it; checked here so a missing one is an error page
    except ImportError:
        raise AuthConfigError("Authlib is not installed (st.login needs it)") from None
    for key in ("redirect_uri", "cookie_secret"):
        if not str(auth.get(key) or "").strip():
            raise AuthConfigError(f"[auth] has no {key}")
    if not _secure_url(auth["redirect_uri"], "[auth] redirect_uri").endswith("/oauth2callback"):
        raise AuthConfigError("[auth] redirect_uri must end with /oauth2callback")
    if len(str(auth["cookie_secret"])) < 32:
        raise AuthConfigError("[auth] cookie_secret is shorter than 32 characters")
    found = providers(auth)
    if not found:
        raise AuthConfigError("[auth] names no identity provider (client_id, client_secret, server_metadata_url)")
    for name, section in found.items():
        where = "[auth]" if name == "default" else f"[auth.{name}]"
        if "_" in name:
            raise AuthConfigError(f"{where}: provider names cannot contain '_'")
        missing = [k for k in PROVIDER_KEYS if not str(section.get(k) or "").strip()]
        if missing:
            raise AuthConfigError(f"{where} is missing {', '.join(missing)}")
        path = _secure_url(section["server_metadata_url"], f"{where} server_metadata_url", local_http=True)
        if not path.endswith("/.well-known/openid-configuration"):
            raise AuthConfigError(f"{where} server_metadata_url is not an OIDC discovery URL "
                                  "(.../.well-known/openid-configuration)")
    return sorted(found)


def auth_section() -> Mapping | None:
    """The ``[auth]`` secrets, None when there are none; raises AuthConfigError for an unreadable file."""
    try:
        if "auth" not in st.secrets:
            return None
        section = st.secrets["auth"]
    except Exception as err:  # noqa: BLE001 -- Streamlit raises one error type for "no file" and "bad file"
        if "pars" in str(err).lower():
            raise AuthConfigError("the secrets file cannot be parsed") from None
        return None
    if not isinstance(section, Mapping):
        raise AuthConfigError("[auth] is not a table")
    return section


def _stop_with(message: str) -> None:
    st.error(message, icon=":material/lock:")
    st.stop()


def require_identity() -> Annotator | None:
    """Sidebar identity widget. Stops the page until the user has logged in, or on a broken setup."""
    try:
        auth = auth_section()
        names = check_auth(auth) if auth is not None else None
    except AuthConfigError as err:
        _stop_with(f"Login is configured but cannot work: {err}. Fix the [auth] section of the UI's "
                   "secrets.toml; the UI does not fall back to demo mode.")
        return None
    if names is not None:
        provider = "default" if "default" in names else names[0]
        if not st.user.is_logged_in:
            st.info("Please log in to use MedXplain.")
            st.button("Log in", on_click=st.login, args=(None if provider == "default" else provider,), key="login")
            st.stop()
        user = st.user.to_dict()
        subject = f"{user.get('iss', '')}|{user.get('sub') or user.get('email') or user.get('name')}"
        name = str(user.get("name") or user.get("email") or "user")
        with st.sidebar:
            st.caption(f"Signed in as **{name}**")
            st.button("Log out", on_click=st.logout, key="logout")
        return Annotator("oidc-" + hashlib.sha256(subject.encode()).hexdigest()[:16], name, "oidc")
    if not demo_mode_enabled():
        _stop_with("No login is configured. Configure OIDC ([auth] in the UI's secrets.toml, see docs/deploy.md) "
                   "or, for a demonstration only, start the UI with MEDXAI_UI_DEMO=1.")
        return None
    with st.sidebar:
        st.warning("Demo mode: no login. Annotations are attributed to the name typed here and are left out of "
                   "the consensus export unless included explicitly.", icon="⚠️")
        name = st.text_input("Annotator name", key=NAME_KEY, max_chars=60, placeholder="e.g. reader-1").strip()
    if not name:
        return None
    return Annotator("demo-" + safe_id(name, 48), name, "demo")
