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
                patient_name: str = "DOE^JANE", patient_id: str = "PID-123456", **attributes) -> bytes:
    """A single-frame 16-bit DICOM; ``attributes`` adds elements by keyword (RescaleSlope=..., WindowCenter=...)."""
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
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
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


def nested_dicom(depth: int) -> bytes:
    """A valid image whose header nests sequences `depth` levels deep."""
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.ones((300, 260), np.uint16))))
    current = ds
    for _ in range(depth):
        item = pydicom.Dataset()
        current.ReferencedImageSequence = Sequence([item])
        current = item
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def dicom_multivalued_rows() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.ones((300, 260), np.uint16))))
    ds.add_new((0x0028, 0x0010), "US", [300, 2])
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def j2k_dicom_claiming(width: int, height: int) -> bytes:
    """JPEG 2000 DICOM whose codestream SIZ marker claims width x height (the header says 300 x 260)."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes((np.arange(300 * 260).reshape(300, 260) % 4000).astype(np.uint16))))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.index(b"\xff\x51")
    frame[siz + 6:siz + 14] = struct.pack(">II", width, height)  # Xsiz, Ysiz (offsets 0)
    ds.PixelData = encapsulate([bytes(frame)])
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def deflated_dicom_bomb(inflated_bytes: int) -> bytes:
    """Deflated-transfer-syntax DICOM whose dataset inflates to `inflated_bytes` (pydicom would inflate it whole)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(None)))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    head = buf.getvalue()
    meta_end = 132 + 12 + struct.unpack("<I", head[140:144])[0]  # preamble + DICM + group length element
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = bytes(1 << 24)
    body = b"".join(squeeze.compress(block) for _ in range(inflated_bytes // len(block))) + squeeze.flush()
    return head[:meta_end] + body


def multipage_tiff(array: np.ndarray, pages: int) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(array) for _ in range(pages)]
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()
