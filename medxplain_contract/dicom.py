"""DICOM parsing with limits: bounded inflation, nesting depth, strict attributes, codestream vs header.

pydicom parses and decodes; what it does not bound is done here before it runs:
- the deflated transfer syntax is inflated by pydicom in one unbounded ``zlib.decompress``: this
  module inflates it with a cap and hands pydicom the plain explicit-VR dataset instead;
- an encapsulated (JPEG / JPEG-LS / JPEG 2000) codestream states its own size, which decoders
  trust over the DICOM header: it is read from the codestream header (pylibjpeg-libjpeg's
  ``get_parameters`` for JPEG, the SIZ marker for JPEG 2000) and must match Rows x Columns first;
- what the object is, before the dataset is parsed: a non-image SOP class (SR, RT Plan, PDF...), a
  multi-frame object and a transfer syntax no installed pixel decoder handles are refused from the
  file meta header (and again from the dataset, which may disagree with it).
Attribute values are read strictly: a multi-valued or malformed Rows is an input error, not a crash.
pydicom's own warnings quote raw element values (which can be patient data) to its logger and to
``warnings``: parsing runs under :func:`quiet`, which also converts every element while silenced.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medxplain_contract.errors import InputError, PayloadTooLarge, UnsupportedMediaType

MAX_SEQUENCE_DEPTH = 8  # mammography headers nest 2-3 levels (e.g. view code sequences)
_JPEG_FAMILY = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.7", "1.2.840.10008.1.2.4.8")
_J2K_FAMILY = ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
               "1.2.840.10008.1.2.4.203")


def read_dataset(data: bytes, max_inflated: int) -> Dataset:
    """Parse one single-frame DICOM image; every parse failure (including recursion on absurd nesting) is a 4xx.

    Refused before the dataset is parsed (from the file meta): non-image SOP classes (``not_an_image``),
    multi-frame IODs (``multiframe_unsupported``), undecodable transfer syntaxes
    (``unsupported_transfer_syntax``); after it, the same from the dataset, no pixel data, NumberOfFrames > 1.
    """
    try:
        with quiet():
            meta = _file_meta(data)
            check_sop_class(str(meta.get("MediaStorageSOPClassUID", "")))
            check_transfer_syntax(meta.get("TransferSyntaxUID"))
            data = _inflate_if_deflated(data, max_inflated)
            ds = pydicom.dcmread(io.BytesIO(data))
            _check_depth(ds, 0)  # also converts every element now, so later reads have nothing to warn about
            check_sop_class(str(ds.get("SOPClassUID", "") or ""))
    except InputError:
        raise
    except MemoryError:
        raise PayloadTooLarge("image_too_large", "the DICOM file does not fit in memory") from None
    except RecursionError:
        raise InputError("dicom_too_nested", f"DICOM sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels") from None
    except Exception as err:  # noqa: BLE001 -- pydicom raises many types for broken files; only the type is shown
        raise InputError("corrupt_dicom", f"could not parse the DICOM file ({type(err).__name__})") from None
    if "PixelData" not in ds:
        raise InputError("dicom_without_pixels", "the DICOM file has no pixel data")
    frames = int_attribute(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InputError("multiframe_unsupported", f"multi-frame DICOM objects ({frames} frames) are not "
                         "supported: send single-frame images")
    if frames != 1:
        raise InputError("unsupported_dicom", "the DICOM file declares no frames")
    return ds


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings and logger: their messages quote raw values ("Invalid value for VR PN: ...")."""
    logger = logging.getLogger("pydicom")
    previous = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = previous


def _file_meta(data: bytes) -> Dataset:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    return _read_file_meta_info(fp)


def sop_class_name(uid: str) -> str:
    """The standard's name of a SOP class, or "an unregistered SOP class" (a raw UID is input: never echoed)."""
    try:
        name = pydicom.uid.UID(uid).name
    except Exception:  # noqa: BLE001 -- a malformed UID string
        name = ""
    return name if name and name != uid and name.isascii() else "an unregistered SOP class"


@functools.lru_cache(maxsize=512)
def _iod_kind(sop_class_uid: str) -> str | None:
    """"image", "multiframe" or "other" by the standard's IOD tables; None when they do not list the class.

    highdicom ships PS3.3's SOP class -> IOD -> module tables and answers exactly these questions
    (its own checks use them); reusing them avoids copying 180 SOP classes here by hand.
    """
    from highdicom._standard_utils import does_iod_have_pixel_data, is_attribute_in_iod

    try:
        if not does_iod_have_pixel_data(sop_class_uid):
            return "other"
        return "multiframe" if is_attribute_in_iod("NumberOfFrames", sop_class_uid) else "image"
    except KeyError:  # private or retired SOP class: judged by its attributes instead
        return None


def check_sop_class(sop_class_uid: str) -> None:
    """Refuse objects that are not single-frame images (SR, RT Plan, PDF; Enhanced MR, SEG, tomosynthesis)."""
    kind = _iod_kind(sop_class_uid.strip()) if sop_class_uid.strip() else None
    if kind == "other":
        raise UnsupportedMediaType("not_an_image", f"the DICOM object is {sop_class_name(sop_class_uid)}, not an "
                                   "image: send image objects (MR, CT, MG...)")
    if kind == "multiframe":
        raise InputError("multiframe_unsupported", f"multi-frame DICOM objects ({sop_class_name(sop_class_uid)}) "
                         "are not supported: send single-frame images")


def check_transfer_syntax(uid: object) -> None:
    """A transfer syntax whose pixel data no installed decoder reads is refused before anything is decoded."""
    if uid is None or str(uid) == "":
        return  # pydicom infers the encoding of files without one; their pixels are native
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(pydicom.uid.UID(str(uid))).is_available
    except Exception:  # noqa: BLE001 -- NotImplementedError for unknown or unsupported syntaxes, ValueError for junk
        available = False
    if not available:
        name = transfer_syntax_name_of(str(uid))
        raise UnsupportedMediaType("unsupported_transfer_syntax", f"DICOM pixel data in {name} cannot be decoded "
                                   "here: send uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 pixel data")


def _inflate_if_deflated(data: bytes, max_inflated: int) -> bytes:
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    fp = io.BytesIO(data)
    preamble = read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[fp.tell():], max_inflated + 1)
    except zlib.error:
        raise InputError("corrupt_dicom", "the deflated DICOM dataset does not inflate") from None
    if len(body) > max_inflated or inflater.unconsumed_tail:
        raise PayloadTooLarge("image_too_large", f"the deflated DICOM dataset inflates beyond {max_inflated >> 20} MiB")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the same dataset, already inflated
    out = io.BytesIO()
    out.write(preamble or b"\x00" * 128)
    out.write(b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    out.write(body)
    return out.getvalue()


def _check_depth(ds: Dataset, depth: int) -> None:
    if depth > MAX_SEQUENCE_DEPTH:
        raise InputError("dicom_too_nested", f"DICOM sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels")
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _check_depth(item, depth + 1)


def int_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """One non-negative integer, or an input error naming the attribute (never its value)."""
    try:
        if keyword not in ds:
            if default is None:
                raise KeyError(keyword)
            return default
        value = ds[keyword].value
        if value is None or value == "":
            if default is None:
                raise ValueError(keyword)
            return default
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            raise ValueError(keyword)  # MultiValue
        number = int(value)
        if number < 0 or number != float(value):
            raise ValueError(keyword)
        return number
    except InputError:
        raise
    except Exception:  # noqa: BLE001 -- pydicom converts raw values lazily and can raise anything here
        raise InputError("bad_dicom_attribute", f"DICOM attribute {keyword} is missing, malformed or "
                         "multi-valued") from None


def text_attribute(ds: Dataset, keyword: str, default: str) -> str:
    try:
        value = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 -- as int_attribute
        value = None
    if not isinstance(value, str):
        raise InputError("bad_dicom_attribute", f"DICOM attribute {keyword} is malformed or multi-valued")
    return value.strip()


def transfer_syntax_name_of(uid: str) -> str:
    """The standard's name of a transfer syntax UID, or "an unknown transfer syntax" (never the raw UID)."""
    try:
        syntax = pydicom.uid.UID(uid)
        name = str(syntax.name) if syntax.is_transfer_syntax else ""
    except Exception:  # noqa: BLE001 -- a malformed UID string
        name = ""
    return name if name and name.isascii() else "an unknown transfer syntax"


def transfer_syntax_name(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return str(uid.name) if uid is not None and uid.is_transfer_syntax else "unknown"
    except Exception:  # noqa: BLE001 -- an unregistered UID string
        return "unknown"


def _j2k_size(frame: bytes) -> tuple[int, int]:
    """(rows, columns) from the SIZ marker segment of a J2K codestream (ISO 15444-1 A.5.1).

    Read by hand because openjpeg's header parse allocates per claimed tile/code-block: 0.7 s for
    a forged 60000 x 60000 claim, more for larger ones. A JP2-wrapped stream is unwrapped first.
    """
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 file has them inside its jp2c box)
    if start < 0 or len(frame) < start + 24:
        raise ValueError("no SIZ marker")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[start + 8:start + 24])
    return ysiz - yosiz, xsiz - xosiz


def check_codestream(ds: Dataset, rows: int, cols: int) -> None:
    """Encapsulated pixel data: the codestream's own size must equal the header's (checked without decoding)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = syntax is not None and bool(syntax.is_compressed)
    except Exception:  # noqa: BLE001 -- an unregistered UID: pydicom refuses to decode it later
        compressed = False
    uid = str(syntax or "")
    if not compressed or not uid.startswith(_JPEG_FAMILY + _J2K_FAMILY):
        return  # RLE and others: the decoder's output size is fixed by Rows x Columns
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        if uid.startswith(_J2K_FAMILY):
            size = _j2k_size(frame)
        else:
            import libjpeg

            params = libjpeg.get_parameters(frame)
            size = (int(params["rows"]), int(params["columns"]))
    except Exception:  # noqa: BLE001 -- truncated fragments or a broken codestream header
        raise InputError("corrupt_dicom", "the encapsulated pixel data has no readable codestream header") from None
    if size != (rows, cols):
        raise InputError("corrupt_dicom", f"the codestream is {size[1]}x{size[0]} pixels but the DICOM header "
                         f"says {cols}x{rows}")
