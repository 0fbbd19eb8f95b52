"""The response contract as JSON Schema (draft 2020-12): validate what the API and the batch job emit.

Schema files live in ``medxplain_contract/schemas/`` (package data, docs/api.md "Schemas"):
``response`` (prediction/explanation, both models: patch, full image, volume), ``error``
(``{code, error, message}``), ``describe`` (the management describe call) and ``batch_result``
(an item's ``result.json``, where each map's ``data`` became ``object``). ``common`` holds the
shared definitions. jsonschema does the validating; this module only loads and names the files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

KINDS = ("response", "error", "describe", "batch_result")
_BASE = "https://medxplain.invalid/schemas/"

__all__ = ["KINDS", "ValidationError", "schema", "validate_response", "validator"]


def schema(kind: str) -> dict:
    """The parsed schema file of ``kind`` (or ``common``)."""
    if kind not in (*KINDS, "common"):
        raise ValueError(f"unknown schema kind {kind!r}; one of {', '.join(KINDS)}")
    return json.loads(resources.files("medxplain_contract").joinpath("schemas", f"{kind}.schema.json").read_text())


@cache
def _registry() -> Registry:
    return Registry().with_resources(
        (f"{_BASE}{kind}.schema.json", Resource.from_contents(schema(kind))) for kind in (*KINDS, "common"))


@cache
def validator(kind: str) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema(kind))
    return Draft202012Validator(schema(kind), registry=_registry())


def validate_response(body: dict, kind: str = "response") -> dict:
    """``body`` if it matches the ``kind`` schema; else :class:`ValidationError` naming the first problem.

    ``kind="auto"`` picks ``error`` for a body with an ``error`` field, else ``response``.
    """
    if kind == "auto":
        kind = "error" if isinstance(body, dict) and "error" in body else "response"
    errors = sorted(validator(kind).iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise ValidationError(f"{kind} schema: at {where}: {first.message[:300]}")
    return body
