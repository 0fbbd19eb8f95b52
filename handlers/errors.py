"""Client errors: every bad input becomes one of these, answered as a 4xx ``{code, message}``."""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as sent; the worker stays healthy."""

    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.status, "error": self.code, "message": self.message}


class PayloadTooLarge(InputError):
    status = 413


class UnsupportedMediaType(InputError):
    status = 415


class ServerError(InputError):
    """An unexpected failure on one item: answered as a 500 for that item only, details go to the log."""

    status = 500
