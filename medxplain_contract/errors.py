"""Client errors: every bad input becomes one of these, answered as a 4xx ``{code, error, message}``.

Messages go into the JSON body *and* the HTTP reason phrase, so they are forced to short printable
ASCII here, whatever the caller wrote: a message must never carry raw input (it may hold patient
data or terminal/HTTP control bytes) nor a library's exception text. Full detail goes to the log
through :func:`log_failure`, which records the exception type and stack, never its message.
"""

from __future__ import annotations

import logging
import re
import traceback

MAX_MESSAGE = 200
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def clean_message(message: str, limit: int = MAX_MESSAGE) -> str:
    """Printable ASCII, at most ``limit`` characters (an ellipsis marks a cut)."""
    text = _UNPRINTABLE.sub("?", " ".join(str(message).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InputError(ValueError):
    """The request cannot be served as sent; the worker stays healthy."""

    status = 400

    def __init__(self, code: str, message: str) -> None:
        message = clean_message(message)
        super().__init__(message)
        self.code = clean_message(code, 64)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.status, "error": self.code, "message": self.message}


class PayloadTooLarge(InputError):
    status = 413


class UnsupportedMediaType(InputError):
    status = 415


class UnprocessableInput(InputError):
    """Well-formed bytes that the pipeline could not use (an unexpected failure while decoding them)."""

    status = 422


class ServerError(InputError):
    """An unexpected failure on one item: answered as a 500 for that item only, details go to the log."""

    status = 500


def log_failure(log: logging.Logger, stage: str, err: BaseException) -> None:
    """Exception type and stack, without the message: library messages can quote input (tag values, names)."""
    stack = "".join(traceback.format_tb(err.__traceback__)[-8:])
    log.error("unexpected %s during %s (message withheld: may quote input)\n%s", type(err).__name__, stage, stack)


def as_row_error(err: BaseException, stage: str, log: logging.Logger) -> InputError:
    """Any exception of one row -> that row's error; unexpected ones are logged, never echoed."""
    if isinstance(err, InputError):
        return err
    log_failure(log, stage, err)
    if isinstance(err, MemoryError):
        return PayloadTooLarge("too_expensive", f"the request needs more memory than this server has ({stage}); "
                               "send a smaller input or ask for fewer maps")
    if stage in ("parse", "decode"):
        return UnprocessableInput("unprocessable_input", "the input could not be decoded; the error was logged")
    return ServerError("internal_error", f"the {stage} step failed for this input; the error was logged")
