"""Builders for valid and malformed request payloads used across the tests."""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def patch_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes((rng.random((227, 227)) * 65535).astype(np.uint16))


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def dicom_bytes(array: np.ndarray | None, photometric: str = "MONOCHROME2",
                patient_name: str = "DOE^JANE", patient_id: str = "PID-123456") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "MG", patient_name, patient_id
    if array is not None:
        ds.Rows, ds.Columns = array.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = array.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def nifti_singular_affine(data: np.ndarray) -> bytes:
    """A NIfTI whose only orientation is an all-zero sform (no qform): no voxel-to-world mapping."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_qform(None, code=0)
    header.set_sform(np.zeros((4, 4)), code=1)
    return gzip.compress(nib.Nifti1Image(data, None, header).to_bytes(), mtime=0)


def gzip_bomb(size_bytes: int) -> bytes:
    """A small .gz that inflates to `size_bytes` of zeros after a valid NIfTI header."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes()[:352]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(header)
        block = bytes(1 << 24)
        for _ in range(size_bytes // len(block)):
            gz.write(block)
    return buf.getvalue()
