"""Object storage for a run: one place for retries, checksums and turning S3 errors into clear messages.

Every write stores the object's sha256 in user metadata (``x-amz-meta-sha256``): multipart ETags
are not content hashes, and the completion markers and the merge compare content by this value.
Transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried with
bounded exponential backoff; credential and permission errors are not retried and surface as
:class:`StorageConfigError` so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3Error

from batch.integrity import verified
from medxplain_contract.storage import S3Config, read_object

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes that mean "try again later", as opposed to "this request is wrong".
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized",
                    "XMinioStorageFull", "OperationTimedOut", "XMinioReadQuorum", "XMinioWriteQuorum"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AllAccessDisabled", "AuthorizationHeaderMalformed"}


class StorageConfigError(RuntimeError):
    """Storage refuses us or cannot be reached at all: a configuration problem (exit 2)."""


class StorageUnavailable(RuntimeError):
    """A transient error outlived the retry budget (the item is not complete; a re-run redoes it)."""


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object already exists (create) or changed since it was read (update)."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes with the ETag to pass as ``If-Match`` when writing it back."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_delay: float = 0.5
    max_delay: float = 8.0  # 0.5 + 1 + 2 + 4 + 8 ~ 15 s of outage is ridden out

    def delays(self) -> Iterator[float]:
        delay = self.first_delay
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_transient(err: BaseException) -> bool:
    if isinstance(err, S3Error):
        return err.code in _TRANSIENT_CODES
    return isinstance(err, (ServerError, InvalidResponseError, Urllib3Error, ConnectionError, TimeoutError))


def describe(err: BaseException) -> str:
    if isinstance(err, S3Error):
        return f"{err.code}: {err.message}"
    return type(err).__name__ + (f": {str(err).splitlines()[0][:200]}" if str(err) else "")


def make_client(config: S3Config, connect_timeout: float = 5.0, read_timeout: float = 120.0) -> Minio:
    """The SDK's default waits 5 min per request; a stopped server should be noticed in seconds."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), maxsize=16,
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    return Minio(config.host, access_key=config.access_key, secret_key=config.secret_key, secure=config.secure,
                 region=config.region, http_client=http)


class Bucket:
    """One bucket, with retried and checksummed operations. Thread-safe (the SDK client is)."""

    def __init__(self, config: S3Config, bucket: str, retry: RetryPolicy | None = None) -> None:
        self.config = config
        self.name = bucket
        self.client = make_client(config)
        self.retry = retry or RetryPolicy()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with backoff on transient errors; auth errors become StorageConfigError."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except S3Error as err:
                if err.code in _AUTH_CODES:
                    raise StorageConfigError(
                        f"storage at {self.config.endpoint_url} refused the request ({err.code}): check "
                        "MEDXAI_S3_ACCESS_KEY / MEDXAI_S3_SECRET_KEY and the bucket policy") from None
                if not is_transient(err):
                    raise
                last = err
            except Exception as err:
                if not is_transient(err):
                    raise
                last = err
            delay = next(delays, None)
            if delay is None:
                raise StorageUnavailable(f"{what} failed after {self.retry.attempts} attempts: {describe(last)}")
            log.debug("retrying %s in %.1fs after %s", what, delay, describe(last))
            time.sleep(delay)

    def ensure(self, create: bool) -> None:
        """Check credentials and reachability up front (clear message, exit 2) and create the bucket."""
        try:
            exists = self.call("bucket check", lambda: self.client.bucket_exists(self.name))
        except StorageUnavailable as err:
            raise StorageConfigError(f"cannot reach storage at {self.config.endpoint_url} ({err})") from None
        if not exists:
            if not create:
                raise StorageConfigError(f"bucket {self.name!r} does not exist at {self.config.endpoint_url}")
            try:
                self.call("bucket creation", lambda: self.client.make_bucket(self.name))
            except S3Error as err:
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageConfigError(f"cannot create bucket {self.name!r}: {err.code}") from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        digest = sha256_bytes(data)
        self.call(f"upload of {key}", lambda: self.client.put_object(
            self.name, key, io.BytesIO(data), len(data), content_type=content_type, metadata={"sha256": digest}))
        return digest

    def put_if(self, key: str, data: bytes, content_type: str = "application/json", *,
               if_match: str | None = None) -> str:
        """Conditional PUT: create only if absent (``If-None-Match: *``) or, with ``if_match``, replace
        only the version with that ETag. Returns the new ETag; raises :class:`PreconditionFailed`.

        The SDK 7.2 has no option for these headers (``metadata=`` would store them as
        ``x-amz-meta-*``), so this goes through its lower-level ``_put_object``, which signs and
        sends headers as given. A retried request whose first attempt did land answers 412 too:
        an existing object with our own sha256 counts as our write.
        """
        digest = sha256_bytes(data)
        headers = {"Content-Type": content_type, "x-amz-meta-sha256": digest}
        headers.update({"If-Match": f'"{if_match}"'} if if_match else {"If-None-Match": "*"})
        try:
            result = self.call(f"conditional upload of {key}",
                               lambda: self.client._put_object(self.name, key, data, headers=headers))
        except S3Error as err:
            if if_match and err.code in ("NoSuchKey", "NoSuchObject"):
                raise PreconditionFailed(key) from None  # the version we read is gone
            if err.code != "PreconditionFailed":
                raise
            stat = self.stat(key)
            if stat is not None and stat[1] == digest and if_match is None:
                return stat[0]
            raise PreconditionFailed(key) from None
        return result.etag

    def get_versioned(self, key: str) -> Versioned | None:
        """Bytes and ETag in one request (the pair an ``If-Match`` update needs), or None if absent."""
        def fetch() -> Versioned:
            response = self.client.get_object(self.name, key)
            try:
                return Versioned(response.read(), response.headers.get("etag", "").strip('"'))
            finally:
                response.close()
                response.release_conn()
        try:
            return self.call(f"download of {key}", fetch)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise

    def stat(self, key: str) -> tuple[str, str | None] | None:
        """(ETag, stored sha256 metadata) or None when the object does not exist."""
        try:
            stat = self.call(f"stat of {key}", lambda: self.client.stat_object(self.name, key))
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        return (stat.etag or "").strip('"'), meta.get("x-amz-meta-sha256")

    def get(self, key: str) -> bytes:
        return self.call(f"download of {key}", lambda: read_object(self.client, self.name, key))

    def get_checked(self, key: str) -> bytes:
        """The object, verified against the ``x-amz-meta-sha256`` its write stored (same request)."""
        def fetch() -> tuple[bytes, str | None]:
            response = self.client.get_object(self.name, key)
            try:
                return response.read(), response.headers.get("x-amz-meta-sha256")
            finally:
                response.close()
                response.release_conn()
        data, expected = self.call(f"download of {key}", fetch)
        return verified(key, data, expected)

    def get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise

    def sha256_of(self, key: str) -> str | None:
        """The stored sha256 metadata, or None when the object does not exist."""
        stat = self.stat(key)
        return None if stat is None else stat[1]

    def remove(self, key: str) -> None:
        self.call(f"removal of {key}", lambda: self.client.remove_object(self.name, key))

    def any_under(self, prefix: str) -> bool:
        """Whether at least one object exists below ``prefix`` (reads one listing entry, not all)."""
        def first() -> bool:
            return next(iter(self.client.list_objects(self.name, prefix=prefix, recursive=True)), None) is not None
        return self.call(f"listing of {prefix or '/'}", first)

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, recursively, in key order."""
        return self.call(f"listing of {prefix or '/'}", lambda: [
            (o.object_name, o.size or 0) for o in self.client.list_objects(self.name, prefix=prefix, recursive=True)
            if not o.is_dir])


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
