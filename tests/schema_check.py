"""Every body a test receives is checked against the response contract (medxplain_contract/schemas)."""

from __future__ import annotations

import json

from medxplain_contract.schema import validate_response


def checked(body, kind: str = "auto") -> dict:
    """``body`` (a dict, JSON text/bytes, or a requests Response) validated; returns the parsed dict.

    ``auto``: an error body when it has an ``error`` field, else a success response.
    """
    if hasattr(body, "json") and callable(body.json):
        body = body.json()
    elif isinstance(body, (bytes, str)):
        body = json.loads(body)
    return validate_response(body, kind)
