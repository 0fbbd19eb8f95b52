"""Import every module of the given packages (found by file, not by walking imports) and print a JSON report.

Run it with ``tests/torchless`` on PYTHONPATH (see sitecustomize.py there) to prove the packages import
without torch: ``python tests/torchless/import_all.py ui medxplain_client medxplain_contract``.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def modules_of(package: str) -> list[str]:
    """Every ``.py`` file under the package folder as a dotted module name (``__init__`` = the package)."""
    names = []
    for path in sorted((REPO / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def main(packages: list[str]) -> None:
    report: dict = {"imported": [], "failed": {}}
    for package in packages:
        for name in modules_of(package):
            try:
                importlib.import_module(name)
                report["imported"].append(name)
            except BaseException as err:  # noqa: BLE001 -- every failure is reported, whatever it is
                report["failed"][name] = "".join(traceback.format_exception_only(type(err), err)).strip()
    for thread in threading.enumerate():  # imports started in the background (e.g. a warm-up) finish first
        if thread is not threading.current_thread():
            thread.join(timeout=60)
    report["torch_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "captum"))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
