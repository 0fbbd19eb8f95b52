"""Pieces shared by the pages: the run picker and the error boundary that turns failures into messages."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import streamlit as st

from medxplain_contract.checksums import IntegrityError
from medxplain_contract.encodings import MapDecodeError
from medxplain_contract.errors import InputError
from medxplain_contract.storage import S3ConfigError
from ui import data
from ui.overlay import DecodeError
from ui.runs import RunInfo, StorageError

log = logging.getLogger("medxplain.ui")
SELECTED_RUN = "selected_run"  # survives page switches (widget keys are dropped with their page)


def guarded(page: Callable[[], None]) -> Callable[[], None]:
    """Run a page; storage, settings and decoding problems become readable messages, never tracebacks."""

    @functools.wraps(page)
    def wrapper() -> None:
        try:
            page()
        except S3ConfigError as err:
            st.error(f"Storage is not configured: {err}")
        except IntegrityError as err:
            st.error(f"Not shown: {err}")
        except StorageError as err:
            st.error(f"Object storage problem: {err}")
        except (DecodeError, InputError, MapDecodeError) as err:
            st.error(f"Cannot display this file: {err}")
        except KeyError as err:
            st.error(f"An object this page needs is missing from the run: {err}")
        except Exception as err:  # a last resort: log the details, show a sentence
            if type(err).__module__.startswith("streamlit"):
                raise  # st.stop / st.rerun / page switches travel as exceptions
            log.exception("page failed")
            st.error(f"Something went wrong ({type(err).__name__}); the details are in the server log.")

    return wrapper


def run_picker(kinds: tuple[str, ...] | None = None, key: str = "run") -> RunInfo | None:
    """Model filter + run select box; remembers the choice across pages."""
    runs = data.list_runs()
    s = data.settings()
    if not runs:
        st.info(f"No finished runs under s3://{s.runs_bucket}/{s.runs_prefix} yet. Start one with "
                "`python -m batch run ... --output s3://BUCKET/PREFIX` and point MEDXAI_UI_RUNS at its parent.")
        return None
    if kinds:
        runs = [r for r in runs if _kind(r) in kinds] or []
        if not runs:
            st.info(f"No {' / '.join(kinds)} runs found.")
            return None
    models = sorted({r.model_name for r in runs})
    col_model, col_run = st.columns([1, 3])
    model = col_model.selectbox("Model", ["all", *models], key=f"{key}_model")
    shown = [r for r in runs if model == "all" or r.model_name == model]
    prefixes = [r.prefix for r in shown]
    remembered = st.session_state.get(SELECTED_RUN)
    index = prefixes.index(remembered) if remembered in prefixes else 0
    labels = {r.prefix: r.label for r in shown}
    prefix = col_run.selectbox("Run", prefixes, index=index, format_func=labels.get, key=f"{key}_prefix")
    st.session_state[SELECTED_RUN] = prefix
    return next(r for r in shown if r.prefix == prefix)


def _kind(info: RunInfo) -> str:
    model = info.manifest.get("model") or {}
    kind = model.get("kind") or info.manifest.get("kind")
    if kind:
        return str(kind)
    return data.run(info.prefix).model_json().get("kind", info.model_name)
