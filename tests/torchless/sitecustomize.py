"""Makes torch, torchvision and captum unimportable in every Python process that has this folder on PYTHONPATH.

Python imports ``sitecustomize`` at start-up, so a subprocess (or ``streamlit run``) started with
``PYTHONPATH=tests/torchless:<repo>`` behaves like the UI image, which has no torch. Each blocked attempt
is appended to ``$MEDXAI_BLOCKED_LOG`` (one JSON line: the module asked for and the file that asked), so a
test can tell a project module that needs torch from a library that merely probes for it.
"""

from __future__ import annotations

import json
import os
import sys

BLOCKED = ("torch", "torchvision", "captum")


class TorchBlocker:
    """A ``sys.meta_path`` finder placed first: it refuses the blocked top-level packages and their submodules."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in BLOCKED:
            _record(name)
            raise ImportError(f"{name} is blocked in this environment (tests/torchless)", name=name)


def _record(name: str) -> None:
    log = os.environ.get("MEDXAI_BLOCKED_LOG")
    if not log:
        return
    files = []  # the importing files, innermost first, without importlib's own frames
    frame = sys._getframe(2)
    while frame is not None:
        if not frame.f_code.co_filename.startswith("<frozen"):
            files.append(frame.f_code.co_filename)
        frame = frame.f_back
    chain = list(dict.fromkeys(files))
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"module": name, "caller": chain[0] if chain else "?", "chain": chain[:12]}) + "\n")


sys.meta_path.insert(0, TorchBlocker())
