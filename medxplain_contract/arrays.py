"""Reading ``.npy`` / ``.npz`` bytes safely from several threads at once.

numpy parses every array header with ``ast.literal_eval``, and CPython 3.11 up to 3.11.7 (and Debian
bookworm's 3.11.2, the images' Python) has a thread-safety bug in the AST validator
(python/cpython gh-106905): two threads parsing at the same time can raise ``SystemError: AST
constructor recursion depth mismatch``. The batch merge and the UI read many items' features
concurrently (storage I/O in a thread pool), which hit it in a clean-clone test run. Header parsing
is microseconds, so one lock around it costs nothing measurable; the downloads stay parallel.
"""

from __future__ import annotations

import io
import threading

import numpy as np

_PARSE = threading.Lock()


def load_npy(data: bytes) -> np.ndarray:
    """One array from ``.npy`` bytes (no pickles)."""
    with _PARSE:
        return np.load(io.BytesIO(data), allow_pickle=False)


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """Every array of ``.npz`` bytes, read eagerly (no pickles)."""
    with _PARSE, np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
