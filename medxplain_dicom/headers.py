"""Source headers as the highdicom builders need them: identity present, geometry explicit.

highdicom copies patient/study identity from a source image by attribute access, so a Type 2
attribute the source left out (StudyTime, ReferringPhysicianName: allowed empty, often absent)
would crash it; :func:`identity_ready` adds them empty on a copy, never inventing values.

Projection mammograms have no patient frame of reference (the Frame of Reference module is optional
in the mammography IODs and scanners rarely send one), while the Parametric Map IOD makes Frame of
Reference and Plane Position/Orientation (Patient) mandatory. highdicom 0.28 accepts such a source
only in principle (its source-without-frame-of-reference path builds a dimension index whose values
no frame carries, and fails in ``_build_luts``; the result would break the PM IOD anyway), so
:func:`detector_plane` gives the header copy a *detector-plane* frame: a new frame of reference UID
derived from the source image's UID, origin at the first pixel, rows along x, columns along y, the
detector's pixel spacing. The parametric map's pixels correspond 1:1 to the source's, which the PM
states with its Derivation Image Sequence (Spatial Locations Preserved YES); no other image shares
that frame of reference, so viewers overlay it by that reference, not by patient geometry.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medxplain_contract.errors import UnprocessableInput

_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "AccessionNumber", "StudyID", "ReferringPhysicianName")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")


def _present(ds: Dataset, keyword: str) -> bool:
    try:
        return keyword in ds and ds[keyword].value not in (None, "", b"")
    except Exception:  # noqa: BLE001 -- lazily converted raw values can fail to parse
        return False


def identity_ready(ds: Dataset) -> Dataset:
    """The source header with every identity attribute present: a copy with empty ones added if it lacks any.

    Raises a 422 when the source lacks what any derived object must reference (its UIDs, its size).
    """
    missing = [k for k in _REQUIRED if not _present(ds, k)]
    if missing:
        raise UnprocessableInput("dicom_source_incomplete",
                                 f"the DICOM source lacks {', '.join(missing)}, which DICOM outputs must reference")
    absent = [k for k in _TYPE2_IDENTITY if k not in ds]
    if not absent:
        return ds  # the builders only read their sources; copying 100 slice headers costs ~0.1 s
    out = copy.deepcopy(ds)  # headers only (DicomSource drops pixel data): small
    for keyword in absent:
        setattr(out, keyword, None)
    return out


def has_patient_geometry(ds: Dataset) -> bool:
    return all(_present(ds, k) for k in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
                                         "PixelSpacing"))


def pixel_spacing(ds: Dataset) -> list[float] | None:
    """Row and column spacing in mm: PixelSpacing, else ImagerPixelSpacing (projection images at the detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if _present(ds, keyword):
            try:
                values = [float(v) for v in ds[keyword].value]
            except (TypeError, ValueError):
                continue
            if len(values) == 2 and all(v > 0 for v in values):
                return values
    return None


def detector_plane(ds: Dataset) -> Dataset:
    """The header, or a copy with a detector-plane frame of reference (module docstring) if it has no geometry."""
    if has_patient_geometry(ds):
        if "SliceThickness" not in ds:
            ds = copy.deepcopy(ds)
            ds.SliceThickness = None  # Type 2: highdicom reads it; absent becomes empty, not invented
        return ds
    ds = copy.deepcopy(ds)
    spacing = pixel_spacing(ds)
    if spacing is None:
        raise UnprocessableInput("dicom_source_without_spacing",
                                 "the DICOM source has no PixelSpacing or ImagerPixelSpacing, which a "
                                 "parametric map needs")
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "detector-plane"])
    ds.PositionReferenceIndicator = None
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = spacing
    ds.SliceThickness = None  # a projection has no slice: left empty, not invented
    return ds
