"""Bytes -> pixels, with limits checked before anything large is allocated.

Pixel data and geometry leave this module; DICOM headers (patient name, ID, dates) leave it only
inside a :class:`~medxplain_contract.dicom_source.DicomSource` (pixel data dropped), which only the
DICOM output builders read, so identity cannot reach responses, logs or object keys.
"""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from PIL import Image

from medxplain_contract import dicom, dicom_series, series_bodies
from medxplain_contract.dicom_source import DicomSource
from medxplain_contract.errors import InputError, PayloadTooLarge, UnsupportedMediaType

MAX_IMAGE_PIXELS = 60_000_000  # a 16-bit FFDM is ~4k x 6k = 24 MP; beyond this is a bomb, not a mammogram
MAX_IMAGE_SIDE = 16_384
MIN_IMAGE_SIDE = 32
MAX_VOLUME_VOXELS = 64_000_000  # 1 mm whole head at 400^3; the model grid is 8.5 M voxels
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024
MAX_DICOM_INFLATED = 2 * MAX_IMAGE_PIXELS + (16 << 20)  # 16-bit pixels of the largest image + header
MAX_SERIES_FILES = dicom_series.MAX_SERIES_FILES


@dataclass
class Image2D:
    """Grey image scaled to [0, 1] (float32, H x W) and how it was read."""

    pixels: np.ndarray
    source_format: str
    bits: int
    warnings: list[str] = field(default_factory=list)
    source: DicomSource | None = None  # DICOM inputs: headers for derived DICOM outputs


@dataclass
class Volume:
    """A 3D scan and its voxel-to-world affine (they travel together, as in nibabel)."""

    data: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
    source: DicomSource | None = None  # DICOM series inputs: one header per slice (data[:, :, k])


def sniff(data: bytes) -> str:
    """Format from magic bytes; file names and content types from clients are not trusted."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if series_bodies.is_zip(data):
        return "zip"
    if series_bodies.is_related(data):
        return "multipart"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return "unknown"


def decode_image(data: bytes) -> Image2D:
    if not data:
        raise InputError("empty_body", "the request carries no image")
    kind = sniff(data)
    if kind == "dicom":
        return _decode_dicom(data)
    if kind in ("png", "jpeg", "tiff"):
        return _decode_pil(data, kind)
    if kind in ("gzip", "nifti"):
        raise UnsupportedMediaType("wrong_modality", "this model takes 2D mammograms (PNG, JPEG, TIFF, DICOM), not NIfTI volumes")
    raise UnsupportedMediaType("unknown_format", "unrecognised image format: send PNG, JPEG, TIFF or DICOM bytes")


def _check_size(height: int, width: int) -> None:
    if height * width > MAX_IMAGE_PIXELS or max(height, width) > MAX_IMAGE_SIDE:
        raise PayloadTooLarge("image_too_large", f"image of {width}x{height} pixels exceeds the limit "
                              f"({MAX_IMAGE_SIDE} px per side, {MAX_IMAGE_PIXELS} pixels)")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputError("image_too_small", f"image of {width}x{height} pixels is smaller than {MIN_IMAGE_SIDE} px")


def _decode_pil(data: bytes, kind: str) -> Image2D:
    """PIL bounds its own inflation (PNG text chunks, TIFF strips) by the declared size checked first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.height, img.width)  # header only: nothing decoded yet
            if getattr(img, "n_frames", 1) != 1:
                raise InputError("unsupported_image", f"multi-frame {kind.upper()} files are not supported: "
                                 "send one image per request")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge("image_too_large", f"the {kind.upper()} header declares more than "
                              f"{MAX_IMAGE_PIXELS} pixels") from None
    except InputError:
        raise
    except MemoryError:
        raise PayloadTooLarge("image_too_large", f"the {kind.upper()} image does not fit in memory") from None
    except Exception:  # noqa: BLE001 -- PIL raises many types for broken files; its text is not for clients
        raise InputError("corrupt_image", f"could not decode the {kind.upper()} image") from None
    mode = img.mode
    if mode == "F":  # float TIFF: no fixed range, so scale min..max like DICOM
        arr = _finite(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        return Image2D(pixels=(arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), source_format=kind, bits=32)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        bits = 16
        arr = arr / 65535.0
    else:
        if mode not in ("L", "LA", "P", "RGB", "RGBA", "1"):
            raise InputError("unsupported_pixel_type", f"unsupported {kind.upper()} pixel mode")
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        bits = 8
    return Image2D(pixels=_finite(np.clip(arr, 0.0, 1.0)), source_format=kind, bits=bits)


def _decode_dicom(data: bytes) -> Image2D:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = dicom.read_dataset(data, MAX_DICOM_INFLATED)  # single-frame image objects only (see there)
    rows, cols = dicom.int_attribute(ds, "Rows"), dicom.int_attribute(ds, "Columns")
    _check_size(rows, cols)
    if dicom.int_attribute(ds, "SamplesPerPixel", 1) != 1:
        raise InputError("unsupported_dicom", "only greyscale DICOM images are supported")
    bits = dicom.int_attribute(ds, "BitsStored", 16)
    dicom.check_codestream(ds, rows, cols)  # before the decoder allocates what the codestream claims
    try:
        with dicom.quiet():
            raw = ds.pixel_array
            arr = apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float32)
    except MemoryError:
        raise PayloadTooLarge("image_too_large", "the DICOM pixel data does not fit in memory") from None
    except Exception:  # noqa: BLE001 -- pydicom raises many types for broken or undecodable pixel data
        raise InputError("corrupt_dicom", f"could not decode DICOM pixel data (transfer syntax "
                         f"{dicom.transfer_syntax_name(ds)})") from None
    if arr.shape != (rows, cols):
        raise InputError("corrupt_dicom", "the DICOM pixel data does not match Rows x Columns")
    arr = _finite(arr)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if dicom.text_attribute(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark
    return Image2D(pixels=arr, source_format="dicom", bits=bits, source=DicomSource([ds], display=arr))


def _finite(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InputError("non_finite_values", "the input contains NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def decode_volume(data: bytes) -> Volume:
    """NIfTI-1 (.nii, .nii.gz), or an MRI DICOM series as a zip archive or a ``multipart/related`` body."""
    if not data:
        raise InputError("empty_body", "the request carries no volume")
    kind = sniff(data)
    if kind == "gzip":
        data = _gunzip(data)
        kind = sniff(data)
    if kind == "zip":
        return decode_series(series_bodies.unzip(data, MAX_SERIES_FILES, MAX_DICOM_INFLATED, MAX_DECOMPRESSED_BYTES))
    if kind == "multipart":
        return decode_series(series_bodies.split_related(data, MAX_SERIES_FILES))
    if kind == "dicom":
        dicom.read_dataset(data, MAX_DICOM_INFLATED)  # a non-image, multi-frame or undecodable object says so
        raise UnsupportedMediaType("wrong_modality", "one DICOM image is not a volume: send the whole MRI series "
                                   "(a zip or multipart/related body of its DICOM files) or a NIfTI file")
    if kind in ("png", "jpeg", "tiff"):
        raise UnsupportedMediaType("wrong_modality", "this model takes 3D volumes (NIfTI, or a DICOM series as a "
                                   "zip or multipart/related body), not 2D images")
    if kind != "nifti":
        raise UnsupportedMediaType("unknown_format", "unrecognised volume format: send NIfTI-1 (.nii or .nii.gz) "
                                   "bytes, or a DICOM series as a zip or multipart/related body")
    try:
        img = nib.Nifti1Image.from_bytes(data)
        shape = img.shape
    except Exception:  # noqa: BLE001 -- nibabel raises several types for malformed headers
        raise InputError("corrupt_nifti", "could not parse the NIfTI header") from None
    shape3 = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    if len(shape3) != 3:
        raise InputError("wrong_dimensions", f"expected a 3D volume, got {len(shape3)} non-trivial dimensions")
    if int(np.prod(shape3)) > MAX_VOLUME_VOXELS:
        raise PayloadTooLarge("volume_too_large", f"volume of shape {shape3} exceeds {MAX_VOLUME_VOXELS} voxels")
    if min(shape3) < 2:
        raise InputError("wrong_dimensions", "every axis of the volume needs at least 2 voxels")
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32).reshape(shape3)
        affine = img.affine
    except MemoryError:
        raise PayloadTooLarge("volume_too_large", "the NIfTI voxel data does not fit in memory") from None
    except Exception:  # noqa: BLE001 -- truncated or inconsistent voxel data, any of several types
        raise InputError("corrupt_nifti", "could not read the NIfTI voxel data") from None
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("bad_affine", "the NIfTI file has no usable voxel-to-world affine")
    return Volume(data=_finite(arr), affine=np.asarray(affine, dtype=np.float64))


def decode_series(files: list[bytes]) -> Volume:
    """DICOM files of one MRI series -> its volume; the headers (one per slice) travel as the volume's source."""
    data, affine, datasets = dicom_series.assemble(files, MAX_VOLUME_VOXELS, MAX_DICOM_INFLATED)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("bad_affine", "the series geometry gives no usable voxel-to-world affine")
    return Volume(data=data, affine=affine, source=DicomSource(datasets, display=data))


def _gunzip(data: bytes) -> bytes:
    """Bounded decompression: a tiny .gz that inflates to gigabytes is refused, not allocated."""
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            while chunk := gz.read(1 << 22):
                out.write(chunk)
                if out.tell() > MAX_DECOMPRESSED_BYTES:
                    raise PayloadTooLarge("volume_too_large", "the gzip stream inflates beyond the size limit")
    except (OSError, EOFError, zlib.error):  # BadGzipFile is an OSError
        raise InputError("corrupt_gzip", "could not decompress the gzip data") from None
    return out.getvalue()
