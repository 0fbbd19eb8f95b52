"""Bodies that carry several DICOM files (an MRI series): a zip archive or a ``multipart/related`` body.

Both are unpacked in memory (nothing touches the disk) and bounded before they are inflated: the
zip's member count from its end-of-central-directory record before ``zipfile`` builds its index,
declared sizes before reading, real sizes while reading. Members are never written out, so a path
cannot escape anywhere, but unsafe names, duplicates, encryption and exotic compression are refused
anyway: such an archive is not an export of a series.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import PurePosixPath

from medxplain_contract import multipart
from medxplain_contract.errors import InputError, PayloadTooLarge

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_MAX_COMMENT = 65_535


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", _EOCD)


def _declared_entries(data: bytes) -> int:
    """Entry count of the end-of-central-directory record (APPNOTE 4.3.16), read before zipfile parses
    the central directory: zipfile builds one object per entry, millions for a small crafted body."""
    pos = data.rfind(_EOCD, max(0, len(data) - _EOCD_SIZE - _MAX_COMMENT))
    if pos < 0 or len(data) < pos + _EOCD_SIZE:
        raise InputError("corrupt_zip", "the zip archive has no end-of-central-directory record")
    (entries,) = struct.unpack_from("<H", data, pos + 10)
    return entries


def _skipped(name: str) -> bool:
    """Directories and what archivers add beside the files: macOS forks, dot-files, the DICOMDIR index."""
    path = PurePosixPath(name)
    return name.endswith("/") or path.parts[:1] == ("__MACOSX",) or path.name.startswith(".") \
        or path.name.upper() == "DICOMDIR"


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and "\x00" not in name and ":" not in name \
        and not path.is_absolute() and ".." not in path.parts


def unzip(data: bytes, max_members: int, max_member_bytes: int, max_total_bytes: int) -> list[bytes]:
    """The zip's file members (in archive order), each at most ``max_member_bytes``, together ``max_total_bytes``."""
    entries = _declared_entries(data)
    if entries > max_members:
        raise PayloadTooLarge("series_too_large", f"the zip archive has more than {max_members} members")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error):
        raise InputError("corrupt_zip", "could not read the zip archive") from None
    if len(infos) > max_members:
        raise PayloadTooLarge("series_too_large", f"the zip archive has more than {max_members} members")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise InputError("bad_zip_member", "the zip archive holds two members of the same name")
    members = [info for info in infos if not _skipped(info.filename)]
    for info in members:
        if not _safe_name(info.filename):
            raise InputError("bad_zip_member", "a zip member has an unsafe path (absolute, '..' or a drive)")
        if info.flag_bits & 0x1:
            raise InputError("bad_zip_member", "the zip archive is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError("bad_zip_member", "zip members must be stored or deflated")
        if info.file_size > max_member_bytes:
            raise PayloadTooLarge("series_too_large", f"a zip member inflates beyond {max_member_bytes >> 20} MiB")
    if sum(info.file_size for info in members) > max_total_bytes:
        raise PayloadTooLarge("series_too_large", f"the zip archive inflates beyond {max_total_bytes >> 20} MiB")
    files, total = [], 0
    for info in members:
        try:
            with archive.open(info) as fh:
                content = fh.read(info.file_size + 1)  # never more than declared (+1 to see a lie)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError):
            raise InputError("corrupt_zip", "a zip member could not be decompressed") from None
        if len(content) != info.file_size:
            raise InputError("corrupt_zip", "a zip member's size differs from what the archive declares")
        total += len(content)
        if total > max_total_bytes:  # unreachable when sizes are honest; kept as the real-size bound
            raise PayloadTooLarge("series_too_large", f"the zip archive inflates beyond {max_total_bytes >> 20} MiB")
        files.append(content)
    if not files:
        raise InputError("incomplete_series", "the zip archive holds no files")
    return files


def is_related(data: bytes) -> bool:
    return multipart.sniff_boundary(data) is not None


def split_related(data: bytes, max_parts: int) -> list[bytes]:
    """The parts of a ``multipart/related`` body whose boundary is its first line (how TorchServe hands it over)."""
    boundary = multipart.sniff_boundary(data)
    if boundary is None:
        raise InputError("bad_multipart", "the body does not start with a multipart boundary line")
    return multipart.decode_related(data, boundary, max_parts=max_parts)
