"""DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) against a hospital PACS, for batch and the CLI.

Credentials come like the S3 ones (``MEDXAI_DICOMWEB_USERNAME[_FILE]``, ``MEDXAI_DICOMWEB_PASSWORD[_FILE]``
or an env file ``MEDXAI_DICOMWEB_ENV_FILE``), never from the command line, and never appear in a log or
an error: URLs are shown without user info or query. ``dicomweb_client.DICOMwebClient`` does the
protocol on a requests session with basic auth and timeouts; every failure leaves this module as one
``PacsError`` line (``PacsAuthError`` for 401/403). UIDs go into request paths only after a syntax
check, and never into messages (a study UID identifies a patient's examination).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from medxplain_contract.errors import InputError
from medxplain_contract.multipart import boundary_of, decode_related
from medxplain_contract.storage import read_env_file, secret

ENV_FILE = "MEDXAI_DICOMWEB_ENV_FILE"
USERNAME, PASSWORD = "MEDXAI_DICOMWEB_USERNAME", "MEDXAI_DICOMWEB_PASSWORD"
TIMEOUT = (10.0, 300.0)  # (connect, read) seconds; a large series takes a while to stream
QIDO_PAGE = 500  # results per QIDO request (servers cap pages; offset walks the rest)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
         "SOPClassUID": "00080016", "Modality": "00080060", "Manufacturer": "00080070",
         "NumberOfSeriesRelatedInstances": "00201209"}
# dicomweb-client logs request URLs (which carry study and series UIDs) at DEBUG and failed SOP instance
# UIDs at ERROR: keep its records out of every log; this module reports failures itself, without UIDs.
logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL + 1)


class PacsError(RuntimeError):
    """The PACS could not be reached or refused a request (one line, no credentials, no UIDs)."""


class PacsAuthError(PacsError):
    """401/403: the credentials are wrong or lack the right (a settings error: exit 2)."""


class PacsConfigError(PacsError, ValueError):
    """Missing or malformed DICOMweb settings or URL (a settings error: exit 2)."""


class PacsTooLarge(PacsError):
    """A retrieved object or series exceeds the caller's byte limit (that item's failure)."""


@dataclass(frozen=True)
class DicomwebConfig:
    """Basic-auth credentials of a DICOMweb service (``repr`` hides the password)."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> DicomwebConfig:
        env = dict(os.environ if environ is None else environ)
        file = env_file or env.get(ENV_FILE)
        if file:
            if not Path(file).is_file():
                raise PacsConfigError(f"DICOMweb settings file not found: {file}")
            env = {**read_env_file(Path(file)), **{k: v for k, v in env.items() if k != ENV_FILE}}
        return cls(_secret(env, USERNAME), _secret(env, PASSWORD))


def _secret(env: Mapping[str, str], name: str) -> str:
    return secret(env, name, PacsConfigError, also=f", or an env file in {ENV_FILE}")


def display_url(url: str) -> str:
    """The URL without user info, query or fragment: safe for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def check_url(url: str) -> str:
    """The DICOMweb root URL, checked: http(s), a host, no credentials or query in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsConfigError("a DICOMweb URL must look like http(s)://host[:port]/dicom-web")
    if parts.username or parts.password:  # never accept secrets on a command line (shell history, ps)
        raise PacsConfigError("put DICOMweb credentials in MEDXAI_DICOMWEB_* settings, not in the URL")
    if parts.query or parts.fragment:
        raise PacsConfigError("a DICOMweb root URL takes no query or fragment")
    return display_url(url)


def is_dicomweb_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def check_uid(uid: str, what: str = "UID") -> str:
    """A UID fit for a request path (digits and dots, at most 64 characters); the value is never echoed."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise PacsConfigError(f"not a valid DICOM {what} (digits and dots, at most 64 characters)")
    return uid


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout (requests has none by default)."""

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", TIMEOUT)
        return super().request(method, url, **kwargs)


class Pacs:
    """One DICOMweb service: the dicomweb-client on an authenticated session, plus the raw retrieve."""

    def __init__(self, url: str, config: DicomwebConfig) -> None:
        self.url = check_url(url)
        self.session = _TimeoutSession()
        self.session.auth = (config.username, config.password)
        self.session.trust_env = False  # no ~/.netrc or proxy credentials from the environment
        self.client = DICOMwebClient(self.url, session=self.session, timeout=TIMEOUT)

    def __repr__(self) -> str:
        return f"Pacs({self.url!r})"

    def fail(self, err: Exception, action: str) -> PacsError:
        """Any failure of ``action`` as one line naming the service (no UIDs, no credentials)."""
        if isinstance(err, PacsError):
            return err
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return PacsAuthError(f"the PACS refused the credentials (HTTP {status}) at {self.url}: check "
                                 f"{USERNAME} / {PASSWORD} (or the file in {ENV_FILE})")
        if status is not None:
            return PacsError(f"{action} failed at {self.url}: HTTP {status}")
        if isinstance(err, requests.Timeout):
            return PacsError(f"{action} timed out at {self.url}")
        if isinstance(err, requests.ConnectionError):
            return PacsError(f"cannot reach the PACS at {self.url} ({action}): connection failed")
        return PacsError(f"{action} failed at {self.url} ({type(err).__name__})")

    def check(self) -> None:
        """One QIDO request: reachable, credentials accepted. Raises PacsAuthError / PacsError."""
        try:
            self.client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
        except Exception as err:  # noqa: BLE001 - translated to one line
            raise self.fail(err, "searching studies") from None

    # -- QIDO-RS ----------------------------------------------------------------------------------

    def _search(self, level: str, filters: dict[str, str], fields: list[str], study: str | None = None,
                series: str | None = None) -> Iterator[dict]:
        search = {"studies": self.client.search_for_studies, "series": self.client.search_for_series,
                  "instances": self.client.search_for_instances}[level]
        scope = {}
        if study is not None:
            scope["study_instance_uid"] = check_uid(study, "study UID")
        if series is not None and level == "instances":
            scope["series_instance_uid"] = check_uid(series, "series UID")
        offset = 0
        while True:
            try:
                page = search(**scope, search_filters=dict(filters), fields=fields, limit=QIDO_PAGE, offset=offset)
            except Exception as err:  # noqa: BLE001
                raise self.fail(err, f"searching {level}") from None
            yield from page
            if len(page) < QIDO_PAGE:
                return
            offset += len(page)

    def series(self, study: str | None = None, series: str | None = None,
               modality: str | None = None) -> list[dict[str, str | None]]:
        """Series matching the filters: dicts of StudyInstanceUID, SeriesInstanceUID, Modality, Manufacturer."""
        filters = {}
        if series is not None:
            filters["SeriesInstanceUID"] = check_uid(series, "series UID")
        if modality is not None:
            filters["Modality"] = modality
        fields = ["Modality", "Manufacturer", "NumberOfSeriesRelatedInstances"]
        return [_flat(r) for r in self._search("series", filters, fields, study=study)]

    def instances(self, study: str, series: str) -> list[dict[str, str | None]]:
        """The series' instances: dicts of StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID."""
        rows = [_flat(r) for r in self._search("instances", {}, ["SOPClassUID"], study=study, series=series)]
        for row in rows:  # some servers omit the scope's own keys from instance rows
            row["StudyInstanceUID"] = row.get("StudyInstanceUID") or study
            row["SeriesInstanceUID"] = row.get("SeriesInstanceUID") or series
        return rows

    def count_instances(self, study: str | None = None) -> int:
        """How many instances the PACS holds (in one study): for tests and the demo's summary."""
        return sum(1 for _ in self._search("instances", {}, ["SOPInstanceUID"], study=study))

    # -- WADO-RS ----------------------------------------------------------------------------------

    def retrieve(self, study: str, series: str, instance: str | None = None, *, max_bytes: int) -> list[bytes]:
        """The stored files of one instance (or every instance of a series), as the PACS keeps them.

        Written on the session rather than with dicomweb-client's ``retrieve_*``: those parse every part
        with pydicom, unbounded and after transcoding, while the engine must see the original bytes
        (``transfer-syntax=*``) and parse them under its own limits (medxplain_contract/dicom.py); and
        the body is streamed with a byte cap, so an enormous object fails this item without filling memory.
        """
        path = f"{self.url}/studies/{check_uid(study, 'study UID')}/series/{check_uid(series, 'series UID')}"
        if instance is not None:
            path += f"/instances/{check_uid(instance, 'SOP instance UID')}"
        what = "retrieving an instance" if instance is not None else "retrieving a series"
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        try:
            with self.session.get(path, headers=headers, stream=True) as response:
                response.raise_for_status()
                body = bytearray()
                for chunk in response.iter_content(1 << 20):
                    body += chunk
                    if len(body) > max_bytes:
                        raise PacsTooLarge(f"{what}: the PACS sent more than {max_bytes} bytes")
                content_type = response.headers.get("Content-Type", "")
        except Exception as err:  # noqa: BLE001
            raise self.fail(err, what) from None
        if content_type.lower().startswith("application/dicom"):  # a single part sent bare (non-conformant)
            return [bytes(body)]
        boundary = boundary_of(content_type)
        if boundary is None:
            raise PacsError(f"{what} at {self.url}: the answer is not multipart/related")
        try:
            return decode_related(bytes(body), boundary)
        except InputError as err:
            raise PacsError(f"{what} at {self.url}: {err.message}") from None

    # -- STOW-RS ----------------------------------------------------------------------------------

    def store(self, datasets: list[Dataset]) -> StoreReceipt:
        """STOW-RS the datasets in one request; raises PacsError unless the PACS stored every one of them."""
        if not datasets:
            raise PacsError("nothing to store")
        encoded = [encode(ds) for ds in datasets]
        try:
            # re-read from the Part 10 bytes: the client writes datasets as they are, and one built in memory
            # has no preamble, so the PACS would keep (and later serve) a file without its DICM prefix
            answer = self.client.store_instances([pydicom.dcmread(io.BytesIO(b)) for b in encoded])
        except requests.HTTPError as err:
            failed = _failed_from_body(err.response)
            if failed:
                raise PacsError(f"the PACS at {self.url} refused {len(failed)} of {len(datasets)} objects "
                                f"(failure reasons {', '.join(sorted(set(failed)))})") from None
            raise self.fail(err, "storing objects") from None
        except Exception as err:  # noqa: BLE001
            raise self.fail(err, "storing objects") from None
        failed = [_reason(item) for item in answer.get("FailedSOPSequence", [])]
        if failed:
            raise PacsError(f"the PACS at {self.url} refused {len(failed)} of {len(datasets)} objects "
                            f"(failure reasons {', '.join(sorted(set(failed)))})")
        referenced = answer.get("ReferencedSOPSequence", [])
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in referenced}
        missing = [ds for ds in datasets if str(ds.SOPInstanceUID) not in stored]
        if missing:
            raise PacsError(f"the PACS at {self.url} confirmed {len(datasets) - len(missing)} of "
                            f"{len(datasets)} stored objects")
        warnings = sum(1 for item in referenced if "WarningReason" in item)
        return StoreReceipt(len(datasets), warnings, digest(encoded))


@dataclass(frozen=True)
class StoreReceipt:
    """What a STOW-RS stored: counts and a digest of the encoded objects (no UIDs, no identity)."""

    objects: int
    warnings: int  # instances the PACS accepted with a warning (e.g. coerced attributes)
    sha256: str


def encode(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (what STOW-RS carries)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def digest(encoded: list[bytes]) -> str:
    """One sha256 over the objects' own sha256s, sorted: the same objects give the same digest in any order."""
    return hashlib.sha256("".join(sorted(hashlib.sha256(b).hexdigest() for b in encoded)).encode()).hexdigest()


def _flat(row: dict) -> dict[str, str | None]:
    """A DICOM JSON row -> keyword -> first value (as text) for the attributes this module reads."""
    out: dict[str, str | None] = {}
    for keyword, tag in _TAGS.items():
        values = row.get(tag, {}).get("Value") or [None]
        out[keyword] = None if values[0] is None else str(values[0])
    return out


def _reason(item: Dataset) -> str:
    value = item.get("FailureReason")
    return f"0x{int(value):04X}" if value is not None else "unknown"


def _failed_from_body(response) -> list[str]:
    """FailureReason codes from a STOW error answer's DICOM JSON body (409 / 400 with FailedSOPSequence)."""
    try:
        body = Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - not a DICOM JSON body
        return []
    return [_reason(item) for item in body.get("FailedSOPSequence", [])]


def connect(url: str, config: DicomwebConfig | None = None, check: bool = True) -> Pacs:
    """A client for the DICOMweb root ``url``; ``check`` makes one QIDO request first (raises PacsAuthError)."""
    pacs = Pacs(url, config or DicomwebConfig.from_env())
    if check:
        pacs.check()
    return pacs


def store(pacs: Pacs, datasets: list[Dataset]) -> StoreReceipt:
    """STOW-RS ``datasets``; raises PacsError on any instance the PACS did not store."""
    return pacs.store(datasets)
