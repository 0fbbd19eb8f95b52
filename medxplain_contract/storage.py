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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


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
        return cls(parsed.netloc, parsed.scheme == "https", _secret(env, "MEDXAI_S3_ACCESS_KEY"),
                   _secret(env, "MEDXAI_S3_SECRET_KEY"), env.get("MEDXAI_S3_REGION") or None)

    def client(self):
        from minio import Minio

        return Minio(self.host, access_key=self.access_key, secret_key=self.secret_key, secure=self.secure,
                     region=self.region)

    def env_lines(self) -> str:
        """The env-file form of this configuration (for ``make serve`` and the demo)."""
        return (f"MEDXAI_S3_ENDPOINT={self.endpoint_url}\nMEDXAI_S3_ACCESS_KEY={self.access_key}\n"
                f"MEDXAI_S3_SECRET_KEY={self.secret_key}\n")


def _secret(env: Mapping[str, str], name: str) -> str:
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as err:
            raise S3ConfigError(f"cannot read {name}_FILE={path}: {err.strerror}") from None
    value = env.get(name)
    if not value:
        raise S3ConfigError(f"{name} (or {name}_FILE) is not set")
    return value


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without surrounding slashes)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise S3ConfigError(f"expected s3://bucket/prefix, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def read_object(client, bucket: str, key: str) -> bytes:
    """The whole object; the SDK's response must be closed and its connection released by hand."""
    response = client.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()
