"""Where object storage is and how to log in: one configuration for the batch job, the UI and the demo.

Settings come from the environment (Kubernetes mounts the credentials as files, so ``*_FILE``
variants are read first) or from an env file such as ``build/stack/minio.env`` written by
``make serve``. Any S3-compatible store works: the code talks plain S3 through the ``minio`` SDK.

| variable | meaning |
| --- | --- |
| ``MEDXAI_S3_ENDPOINT`` | ``http(s)://host:port`` (scheme decides TLS; a bare ``host:port`` means TLS) |
| ``MEDXAI_S3_ACCESS_KEY_FILE`` / ``MEDXAI_S3_ACCESS_KEY`` | access key (file preferred) |
| ``MEDXAI_S3_SECRET_KEY_FILE`` / ``MEDXAI_S3_SECRET_KEY`` | secret key (file preferred) |
| ``MEDXAI_S3_REGION`` | optional region |
| ``MEDXAI_S3_ENV_FILE`` | a ``KEY=VALUE`` file holding any of the above |

:class:`Bucket` is the one storage layer of the project (batch, UI, client, devstack, archives):
every write stores the object's sha256 in user metadata (``x-amz-meta-sha256``; multipart ETags
are not content hashes, and completion markers and the merge compare content by this value).
Transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried with
bounded exponential backoff; credential and permission errors are not retried and surface as
:class:`StorageConfigError` so a CLI can print one line and exit 2.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3Error

from medxplain_contract.checksums import verified

log = logging.getLogger(__name__)
T = TypeVar("T")
_MISSING = ("NoSuchKey", "NoSuchObject")


class S3ConfigError(ValueError):
    """Storage settings are missing or malformed (a message for people, no traceback needed)."""


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class S3Config:
    host: str  # host:port, as the minio SDK wants it
    secure: bool
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str | None = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> S3Config:
        env = dict(os.environ if environ is None else environ)
        file = env_file or env.get("MEDXAI_S3_ENV_FILE")
        if file:
            if not Path(file).is_file():
                raise S3ConfigError(f"storage settings file not found: {file}")
            env = {**read_env_file(Path(file)), **{k: v for k, v in env.items() if k != "MEDXAI_S3_ENV_FILE"}}
        endpoint = env.get("MEDXAI_S3_ENDPOINT")
        if not endpoint:
            raise S3ConfigError("MEDXAI_S3_ENDPOINT is not set (e.g. http://127.0.0.1:9000); "
                                "or point MEDXAI_S3_ENV_FILE at build/stack/minio.env after `make serve`")
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
            raise S3ConfigError(f"MEDXAI_S3_ENDPOINT must look like http(s)://host:port, got {endpoint!r}")
        return cls(parsed.netloc, parsed.scheme == "https", secret(env, "MEDXAI_S3_ACCESS_KEY"),
                   secret(env, "MEDXAI_S3_SECRET_KEY"), env.get("MEDXAI_S3_REGION") or None)

    def client(self) -> Minio:
        return make_client(self)

    def env_lines(self) -> str:
        """The env-file form of this configuration (for ``make serve`` and the demo)."""
        return (f"MEDXAI_S3_ENDPOINT={self.endpoint_url}\nMEDXAI_S3_ACCESS_KEY={self.access_key}\n"
                f"MEDXAI_S3_SECRET_KEY={self.secret_key}\n")


def secret(env: Mapping[str, str], name: str, error: type[Exception] | None = None, also: str = "") -> str:
    """A credential from ``<name>_FILE`` (how Kubernetes mounts secrets; preferred) or ``<name>``; ``error``
    (default S3ConfigError) names what is missing, ``also`` any further place it may come from."""
    error = error or S3ConfigError
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as err:
            raise error(f"cannot read {name}_FILE={path}: {err.strerror}") from None
    value = env.get(name)
    if not value:
        raise error(f"{name} (or {name}_FILE{also}) is not set")
    return value


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without surrounding slashes)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise S3ConfigError(f"expected s3://bucket/prefix, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def read_object(client, bucket: str, key: str) -> bytes:
    """The whole object (an SDK client, no retries: the storage-policy tests and small tools)."""
    return read_with_headers(client, bucket, key)[0]


def read_with_headers(client, bucket: str, key: str) -> tuple[bytes, Mapping[str, str]]:
    """Bytes and response headers in one GET; the SDK's response must be closed and released by hand."""
    response = client.get_object(bucket, key)
    try:
        return response.read(), response.headers
    finally:
        response.close()
        response.release_conn()

T = TypeVar("T")

# S3 error codes that mean "try again later", as opposed to "this request is wrong".
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized",
                    "XMinioStorageFull", "OperationTimedOut", "XMinioReadQuorum", "XMinioWriteQuorum"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AllAccessDisabled", "AuthorizationHeaderMalformed"}


class StorageError(RuntimeError):
    """Object storage could not be used; the message is meant for people."""


class StorageConfigError(StorageError):
    """Storage refuses us or cannot be reached at all: a configuration problem (exit 2)."""


class StorageUnavailable(StorageError):
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

    def __init__(self, config: S3Config | None, bucket: str, retry: RetryPolicy | None = None,
                 client: Minio | None = None) -> None:
        if config is None and client is None:
            raise ValueError("a Bucket needs an S3Config or an SDK client")
        self.config = config
        self.name = bucket
        self.client = client if client is not None else make_client(config)
        self.retry = retry or RetryPolicy()
        self.endpoint = config.endpoint_url if config is not None else "object storage"

    @classmethod
    def of(cls, client: Minio, bucket: str, retry: RetryPolicy | None = None) -> Bucket:
        """A Bucket over an SDK client someone else made (the UI's cached client, tests)."""
        return cls(None, bucket, retry, client=client)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with backoff on transient errors; auth errors become StorageConfigError."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except S3Error as err:
                if err.code in _AUTH_CODES:
                    raise StorageConfigError(
                        f"storage at {self.endpoint} refused the request ({err.code}): check "
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

    def exists_bucket(self) -> bool:
        return self.call("bucket check", lambda: self.client.bucket_exists(self.name))

    def ensure(self, create: bool) -> None:
        """Check credentials and reachability up front (clear message, exit 2) and create the bucket."""
        try:
            exists = self.exists_bucket()
        except StorageUnavailable as err:
            raise StorageConfigError(f"cannot reach storage at {self.endpoint} ({err})") from None
        if not exists:
            if not create:
                raise StorageConfigError(f"bucket {self.name!r} does not exist at {self.endpoint}")
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

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> str:
        """Upload a file (streamed, multipart when large) with its sha256 in the metadata."""
        from medxplain_contract.integrity import sha256_file

        digest = sha256_file(Path(path))
        self.call(f"upload of {key}", lambda: self.client.fput_object(
            self.name, key, str(path), content_type=content_type, metadata={"sha256": digest}))
        return digest

    def get_file(self, key: str, path: Path) -> str | None:
        """Download an object to ``path``; returns the sha256 its write stored (None: none stored)."""
        self.call(f"download of {key}", lambda: self.client.fget_object(self.name, key, str(path)))
        return self.sha256_of(key)

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
            data, headers = read_with_headers(self.client, self.name, key)
            return Versioned(data, headers.get("etag", "").strip('"'))
        try:
            return self.call(f"download of {key}", fetch)
        except S3Error as err:
            if err.code in _MISSING:
                return None
            raise

    def stat(self, key: str) -> tuple[str, str | None] | None:
        """(ETag, stored sha256 metadata) or None when the object does not exist."""
        try:
            stat = self.call(f"stat of {key}", lambda: self.client.stat_object(self.name, key))
        except S3Error as err:
            if err.code in _MISSING:
                return None
            raise
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        return (stat.etag or "").strip('"'), meta.get("x-amz-meta-sha256")

    def get(self, key: str) -> bytes:
        return self.call(f"download of {key}", lambda: read_object(self.client, self.name, key))

    def get_checked(self, key: str) -> bytes:
        """The object, verified against the ``x-amz-meta-sha256`` its write stored (same request)."""
        def fetch() -> tuple[bytes, str | None]:
            data, headers = read_with_headers(self.client, self.name, key)
            return data, headers.get("x-amz-meta-sha256")
        data, expected = self.call(f"download of {key}", fetch)
        return verified(key, data, expected)

    def get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except S3Error as err:
            if err.code in _MISSING:
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

    def read(self, key: str) -> bytes:
        """The object, or KeyError when it (or the bucket) does not exist; other refusals are StorageError."""
        try:
            return self.get(key)
        except S3Error as err:
            if err.code in (*_MISSING, "NoSuchBucket"):
                raise KeyError(key) from None
            raise StorageError(f"storage refused reading {key}: {err.code}") from None

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def children(self, prefix: str) -> list[str]:
        """The "folders" directly below ``prefix`` (no trailing slash); KeyError when the bucket is absent."""
        start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        try:
            objects = self.call(f"listing of {start or '/'}", lambda: list(
                self.client.list_objects(self.name, prefix=start)))
        except S3Error as err:
            if err.code == "NoSuchBucket":
                raise KeyError(self.name) from None
            raise StorageError(f"storage refused listing {start or '/'}: {err.code}") from None
        return [o.object_name.rstrip("/") for o in objects if o.is_dir]

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, recursively, in key order."""
        return self.call(f"listing of {prefix or '/'}", lambda: [
            (o.object_name, o.size or 0) for o in self.client.list_objects(self.name, prefix=prefix, recursive=True)
            if not o.is_dir])
