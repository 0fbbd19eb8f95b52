"""Archive integrity: a ``.mar`` carries Python code that TorchServe executes, so nothing loads one unchecked.

``python -m model_store archive`` publishes ``<name>.mar.sha256`` next to every archive (the
``sha256sum`` format, so ``sha256sum -c ddsm.mar.sha256`` works by hand) and, when a signing key is
configured, ``<name>.mar.sha256.sig``: HMAC-SHA256 of that digest line under the key. Whoever can
write the model bucket can replace an archive *and* its digest file, but cannot forge the HMAC
without the key, which lives in a separate Secret. The digest may also come from a separately
stored list (``--digests FILE``, e.g. a ConfigMap: one ``sha256sum`` line per archive).

Every loader checks before use: the devstack before TorchServe starts, the serve image's entrypoint
(``docker/serve/entrypoint.py``), the archive fetch (``docker/archives.py``) and the batch job
(``batch/archive.py``).

| variable | meaning |
| --- | --- |
| ``MEDXAI_ARCHIVE_KEY_FILE`` | file holding the HMAC key; when set, a missing or wrong signature is refused |

HMAC (``hmac`` from the standard library) rather than public-key signatures: no signing library is
a dependency here, and the publisher and the verifiers are the same operator's components.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path

DIGEST_SUFFIX = ".sha256"
SIGNATURE_SUFFIX = ".sha256.sig"
KEY_ENV = "MEDXAI_ARCHIVE_KEY_FILE"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *]?(\S+)$")


class ArchiveIntegrityError(ValueError):
    """The archive does not match its digest or signature (one line, safe to print)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def signing_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The HMAC key from ``MEDXAI_ARCHIVE_KEY_FILE``, or None when no key is configured."""
    env = os.environ if environ is None else environ
    path = env.get(KEY_ENV)
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as err:
        raise ArchiveIntegrityError(f"cannot read {KEY_ENV}={path}: {err.strerror}") from None
    if len(key) < 16:
        raise ArchiveIntegrityError(f"the archive signing key in {path} is shorter than 16 bytes")
    return key


def signature(key: bytes, line: str) -> str:
    """HMAC-SHA256 (hex) of a digest line: the content of ``<name>.mar.sha256.sig``."""
    return hmac.new(key, line.encode(), hashlib.sha256).hexdigest()


def write_digest(mar: Path, key: bytes | None = None) -> Path:
    """Write ``<mar>.sha256`` (and ``.sha256.sig`` with a key); returns the digest file."""
    mar = Path(mar)
    line = f"{sha256_file(mar)}  {mar.name}\n"
    digest_file = mar.with_name(mar.name + DIGEST_SUFFIX)
    digest_file.write_text(line)
    sig_file = mar.with_name(mar.name + SIGNATURE_SUFFIX)
    if key:
        sig_file.write_text(signature(key, line) + "\n")
    else:
        sig_file.unlink(missing_ok=True)  # a stale signature from an earlier key would mislead
    return digest_file


def read_digest_list(path: Path) -> dict[str, str]:
    """``sha256sum`` lines -> {file name: sha256} (a separately stored digest list)."""
    out = {}
    for raw in Path(path).read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        match = _LINE.match(raw)
        if not match:
            raise ArchiveIntegrityError(f"{Path(path).name}: not a sha256sum line")
        out[Path(match.group(2)).name] = match.group(1)
    return out


def verify_archive(mar: Path, key: bytes | None = None, digests: Mapping[str, str] | None = None) -> str:
    """Check ``mar`` against its expected sha256 and return that sha256; raise on any doubt.

    The expected digest is ``digests[name]`` when a separate list is given, else the line in
    ``<mar>.sha256``; with a key, the digest file's HMAC must match too.
    """
    mar = Path(mar)
    name = mar.name
    if digests is not None:
        if name not in digests:
            raise ArchiveIntegrityError(f"{name}: not in the digest list, refusing to load it")
        expected = digests[name]
    else:
        digest_file = mar.with_name(name + DIGEST_SUFFIX)
        try:
            line = digest_file.read_text()
        except OSError:
            raise ArchiveIntegrityError(f"{name}: no {name}{DIGEST_SUFFIX} next to it, refusing to load it") from None
        match = _LINE.match(line.strip())
        if not match or Path(match.group(2)).name != name:
            raise ArchiveIntegrityError(f"{name}{DIGEST_SUFFIX} is not a sha256sum line for {name}")
        expected = match.group(1)
        if key:
            try:
                stored = mar.with_name(name + SIGNATURE_SUFFIX).read_text().strip()
            except OSError:
                raise ArchiveIntegrityError(f"{name}: no signature ({name}{SIGNATURE_SUFFIX}) but a signing key "
                                            "is configured, refusing to load it") from None
            if not hmac.compare_digest(stored, signature(key, line)):
                raise ArchiveIntegrityError(f"{name}: digest signature does not match the signing key, "
                                            "refusing to load it")
    actual = sha256_file(mar)
    if not hmac.compare_digest(actual, expected):
        raise ArchiveIntegrityError(f"{name}: sha256 {actual[:12]}... does not match the published "
                                    f"{expected[:12]}..., refusing to load it")
    return actual


def verify_store(store: Path, key: bytes | None = None, digests: Mapping[str, str] | None = None) -> dict[str, str]:
    """Verify every ``*.mar`` of a model store folder; {file name: sha256}."""
    return {mar.name: verify_archive(mar, key, digests) for mar in sorted(Path(store).glob("*.mar"))}
