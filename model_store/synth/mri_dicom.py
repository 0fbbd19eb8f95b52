"""A synthetic MRI volume (NIfTI grid) as a DICOM series: one MR Image Storage file per k-slice.

The series is what a scanner would send for the same volume, so tests can prove that the DICOM path
and the NIfTI path see the same voxels in the same world. Geometry follows the usual NIfTI <-> DICOM
convention (as in dcm2niix and nibabel.nicom): NIfTI world is RAS+, DICOM patient space LPS+, so
``LPS = diag(-1, -1, 1) @ RAS``; voxel ``data[i, j, k]`` is row ``j``, column ``i`` of slice ``k``.
Patient tags are made up but realistic in form (SYNTHETIC^..., SYN-PID-...) so tests can show they
never leak; UIDs are hashed from (seed, subject), so files are byte-identical across runs.
Built with pydicom's Dataset (highdicom builds derived objects, not scanner images).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

GENERATOR_NAME = "medxai-synth-mri"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(value: float) -> float:
    """The value a reader gets back from a DS (decimal string, 16 chars at most) attribute."""
    return float(format_number_as_ds(float(value)))


def series_geometry(affine: np.ndarray, n_slices: int) -> dict[str, object]:
    """DICOM plane geometry of every k-slice of a NIfTI (RAS+) grid.

    Returns ImageOrientationPatient (row direction = +i, column direction = +j, in LPS), PixelSpacing
    ([between rows = |j step|, between columns = |i step|]), SliceThickness (|k step|) and one
    ImagePositionPatient (centre of voxel (0, 0, k)) per slice.
    """
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    step = lps[:3, :3]
    spacing = np.linalg.norm(step, axis=0)
    if np.any(spacing < 1e-6):
        raise ValueError("the affine has a degenerate axis")
    row_dir, col_dir = step[:, 0] / spacing[0], step[:, 1] / spacing[1]
    positions = [lps[:3, 3] + k * step[:, 2] for k in range(n_slices)]
    return {
        "ImageOrientationPatient": [_ds(v) for v in (*row_dir, *col_dir)],
        "PixelSpacing": [_ds(spacing[1]), _ds(spacing[0])],
        "SliceThickness": _ds(spacing[2]),
        "ImagePositionPatient": [[_ds(v) for v in p] for p in positions],
    }


def _quantise(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint16 stored values and (slope, intercept) as DS round-trips them: value = stored * slope + intercept.

    One scaling for the whole series (as most scanners write a series), so the recovered float volume
    is within ``slope / 2`` of the input everywhere.
    """
    lo, hi = float(volume.min()), float(volume.max())
    intercept = _ds(lo)
    slope = _ds((hi - intercept) / 65535.0) if hi > intercept else 1.0
    while (hi - intercept) / slope > 65535.0:  # DS rounding of the slope went down: widen by one ulp of text
        slope = _ds(slope * (1 + 1e-12) + 1e-15)
    stored = np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    subject: str,
    seed: int,
    subject_index: int = 0,
    series_description: str = "T1 MPRAGE (synthetic)",
) -> list[Path]:
    """Write ``volume`` (i, j, k) as ``out_dir/slice-{k:04d}.dcm``; returns the paths in slice order.

    ``subject_index`` numbers the made-up patient identity (patient n = index + 1), as synth/mammo.py does.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = subject_index + 1

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[GENERATOR_NAME, str(seed), subject, *parts])

    geometry = series_geometry(affine, volume.shape[2])
    stored, slope, intercept = _quantise(volume)
    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame-of-reference")
    # A stable made-up acquisition time per subject (HHMMSS), so files stay byte-identical.
    clock = zlib.crc32(f"{seed}/{subject}".encode()) % 36000
    time = f"{8 + clock // 3600:02d}{clock % 3600 // 60:02d}{clock % 60:02d}"
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid("sop", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = f"SYN-ACC-MR{n:06d}"
        ds.Modality = "MR"
        ds.Manufacturer = GENERATOR_NAME
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Brain MRI (synthetic)"
        ds.SeriesDescription = series_description
        ds.PatientName = f"SYNTHETIC^MRPATIENT{n}"
        ds.PatientID = f"SYN-PID-MR{n:06d}"
        ds.PatientBirthDate = f"{1935 + 7 * n % 40}{n % 12 + 1:02d}{n % 28 + 1:02d}"
        ds.PatientSex = "F" if n % 2 else "M"
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = geometry["SliceThickness"]
        ds.SpacingBetweenSlices = geometry["SliceThickness"]
        ds.RepetitionTime = 2300
        ds.EchoTime = 2.98
        ds.InversionTime = 900
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3
        ds.FlipAngle = 9
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"MR{n}"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = geometry["ImagePositionPatient"][k]
        ds.ImageOrientationPatient = geometry["ImageOrientationPatient"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = geometry["ImagePositionPatient"][k][2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]  # slice k as (rows = j, columns = i)
        ds.PixelSpacing = geometry["PixelSpacing"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        path = out_dir / f"slice-{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
