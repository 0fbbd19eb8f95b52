"""One error type for every failed call, so callers and the CLI can tell their fault from the server's."""

from __future__ import annotations


class ClientError(Exception):
    """A failed call; ``status`` is the HTTP status (or the gRPC code's equivalent), None if nothing answered."""

    def __init__(self, status: int | None, error: str, message: str, attempts: int = 1) -> None:
        super().__init__(status, error, message)
        self.status = status
        self.error = error
        self.message = message
        self.attempts = attempts  # how many times the request was sent (retries included)

    def __str__(self) -> str:
        where = f"{self.status} {self.error}: " if self.status is not None else ""
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{where}{self.message}{tries}"

    @property
    def is_client_fault(self) -> bool:
        """A 4xx: resending the same request cannot help."""
        return self.status is not None and 400 <= self.status < 500

    @property
    def retryable(self) -> bool:
        """Overloaded (503) or unreachable: worth another try after a pause."""
        return self.status == 503


class ConnectionFailed(ClientError):
    """No answer at all (refused, reset, DNS, connect timeout)."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(None, "connection_failed", message, attempts)

    @property
    def retryable(self) -> bool:
        return True
