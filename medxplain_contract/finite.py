"""Never NaN in JSON: non-finite numbers in a result become null, with a warning saying so.

Python's ``json`` writes NaN/Infinity by default, which strict JSON parsers (browsers, Java, Go)
refuse; a model fed a pathological input can produce them in probabilities or unit scores.
"""

from __future__ import annotations

import math

NON_FINITE_WARNING = "some values were not finite (NaN or infinite) and are returned as null"


def finite_json(response: dict) -> dict:
    """The response with every non-finite float replaced by None (and one warning added)."""
    found = [False]
    clean = _walk(response, found)
    if found[0]:
        clean.setdefault("warnings", [])
        if NON_FINITE_WARNING not in clean["warnings"]:
            clean["warnings"].append(NON_FINITE_WARNING)
    return clean


def _walk(value, found: list[bool]):
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        found[0] = True
        return None
    if isinstance(value, dict):
        return {k: _walk(v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, found) for v in value]
    return value
