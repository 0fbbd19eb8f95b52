"""``multipart/related; type="application/dicom"`` bodies (DICOM PS3.18 §8.6.1): what STOW-RS carries.

The server answers ``output=dicom`` with one; an MRI series may be uploaded as one; the client splits
one to store its parts. Written here by hand (about 40 lines) because the standard library's ``email``
package parses text-first (it may rewrite line endings and headers of binary parts) and
dicomweb-client keeps its own encoder and decoder private.
"""

from __future__ import annotations

import re
import secrets

from medxplain_contract.errors import InputError

DICOM_TYPE = "application/dicom"
MAX_PARTS = 4096  # an MRI series has a few hundred slices
_BOUNDARY = re.compile(r'boundary="?([0-9A-Za-z\'()+_,\-./:=? ]{1,70})"?', re.IGNORECASE)


def encode_related(parts: list[bytes], part_type: str = DICOM_TYPE) -> tuple[bytes, str]:
    """Parts -> (body, Content-Type header value); the boundary is random and checked against the parts."""
    while True:
        boundary = f"medxplain-{secrets.token_hex(16)}"
        marker = f"--{boundary}".encode("ascii")
        if not any(marker in part for part in parts):
            break
    chunks = []
    for part in parts:
        chunks += [marker, b"\r\nContent-Type: ", part_type.encode("ascii"), b"\r\n\r\n", part, b"\r\n"]
    chunks += [marker, b"--\r\n"]
    return b"".join(chunks), f'multipart/related; type="{part_type}"; boundary={boundary}'


def boundary_of(content_type: str) -> str | None:
    """The boundary parameter of a multipart Content-Type value, or None."""
    if not content_type.lower().startswith("multipart/"):
        return None
    match = _BOUNDARY.search(content_type)
    return match.group(1).strip() if match else None


def sniff_boundary(body: bytes) -> str | None:
    """A multipart body's boundary read from its first line (``--boundary``), for bodies sent without
    their Content-Type (TorchServe hands the handler the body only)."""
    if not body.startswith(b"--"):
        return None
    line = body[2:body.find(b"\r\n")] if b"\r\n" in body[:80] else b""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _BOUNDARY.fullmatch(f"boundary={text}") else None


def decode_related(body: bytes, boundary: str, max_parts: int = MAX_PARTS) -> list[bytes]:
    """The parts' bodies in order (their headers are read only to find where each body starts).

    A body that is not such a message, has no parts or more than ``max_parts`` is an input error.
    """
    marker = b"--" + boundary.encode("ascii")
    if not body.startswith(marker):
        raise InputError("bad_multipart", "the multipart body does not start with its boundary")
    sections = body.split(b"\r\n" + marker)
    sections[0] = sections[0][len(marker):]
    if len(sections) - 1 > max_parts:
        raise InputError("bad_multipart", f"the multipart body has more than {max_parts} parts")
    parts = []
    for section in sections:
        if section.startswith(b"--"):  # the closing delimiter
            break
        _headers, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise InputError("bad_multipart", "a multipart part has no header/body separator")
        parts.append(content)
    else:
        raise InputError("bad_multipart", "the multipart body has no closing boundary")
    if not parts:
        raise InputError("bad_multipart", "the multipart body has no parts")
    return parts
