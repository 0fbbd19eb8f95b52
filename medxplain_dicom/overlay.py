"""An RGB Secondary Capture of the heatmap blended on the image, for PACS viewers without parametric maps.

The grey image is the source as the model saw it (``DicomSource.display``), windowed to its 1st..99th
percentile; the map, scaled to its own range, is blended in a blue-cyan-yellow-red colour scale whose
opacity grows with relevance (low relevance leaves the image visible). Mammogram: the whole image.
MRI series: one capture of the source slice through the map's peak (the slice holding the map's
largest value), referencing that slice, since a Secondary Capture is a single picture and the
parametric map already carries every slice. Burned-in pixels are the only content; no text is drawn,
so nothing of the patient's identity enters the picture.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import JPEGLSLossless

from medxplain_dicom import codes, parametric_map
from medxplain_dicom.algorithm import Algorithm

# Anchors of the colour scale (value -> RGB). Written out because numpy and PIL ship no colormaps and
# matplotlib is not a dependency of this torch-free layer.
_ANCHORS = np.array([0.0, 0.35, 0.5, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 200, 255], [120, 255, 120], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
MAX_OPACITY = 0.6


_LUT = np.stack([np.interp(np.linspace(0.0, 1.0, 256), _ANCHORS, _COLOURS[:, c]) for c in range(3)],
                axis=-1).astype(np.float32)  # 256 colours: one table lookup per pixel instead of 3 interpolations


def _unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` scaled so [lo, hi] -> [0, 1], clipped; non-finite values -> 0; float32."""
    scaled = (values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo) if hi > lo \
        else np.zeros(values.shape, np.float32)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)


def _finite_range(values: np.ndarray, percentiles: tuple[float, float] | None = None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    if percentiles is None:
        return float(finite.min()), float(finite.max())
    lo, hi = np.percentile(finite, percentiles)
    return float(lo), float(hi)


def blend(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(rows, cols) image and map -> (rows, cols, 3) uint8 RGB."""
    base = _unit_range(grey, *_finite_range(grey, (1.0, 99.0)))[..., None] * np.float32(255)
    value = _unit_range(heat, *_finite_range(heat))
    colour = _LUT[np.rint(value * 255).astype(np.uint8)]
    alpha = (np.float32(MAX_OPACITY) * value)[..., None]
    return np.rint(base * (1 - alpha) + colour * alpha).astype(np.uint8)


def peak_frame(frames: np.ndarray) -> int:
    """Index of the frame holding the map's largest finite value (frame 0 for an all-non-finite map)."""
    flat = np.where(np.isfinite(frames), frames, -np.inf).reshape(len(frames), -1)
    return int(np.argmax(flat.max(axis=1))) if np.isfinite(flat).any() else 0


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient orientation letters of rows and columns: from ImageOrientationPatient, else a placeholder."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return ("A", "F")  # replaced by the source's own PatientOrientation in build()
    letters = []
    for vector in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(("RL", "AP", "FH")[axis][int(vector[axis] > 0)])  # LPS: +x left, +y posterior, +z head
    return letters[0], letters[1]


def build(source: Dataset, grey: np.ndarray, heat: np.ndarray, method: str, algorithm: Algorithm, *,
          series_uid: str, sop_uid: str, series_number: int) -> hd.sc.SCImage:
    """One RGB capture of ``source`` (a header from :mod:`headers`); ``grey`` and ``heat`` on its pixel grid."""
    if grey.shape != heat.shape or grey.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError("the overlay needs the image and the map on the source image's grid")
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    sc = hd.sc.SCImage(
        pixel_array=blend(grey, heat), photometric_interpretation="RGB", bits_allocated=8,
        transfer_syntax_uid=JPEGLSLossless,  # lossless, a third of the native size (sizes: parametric_map.py)
        coordinate_system="PATIENT", study_instance_uid=source.StudyInstanceUID, series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=algorithm.equipment()["manufacturer"], patient_id=source.PatientID,
        patient_name=source.PatientName, patient_birth_date=source.PatientBirthDate, patient_sex=source.PatientSex,
        accession_number=source.AccessionNumber, study_id=source.StudyID, study_date=source.StudyDate,
        study_time=source.StudyTime, referring_physician_name=source.ReferringPhysicianName,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        patient_orientation=_orientation(source),
        series_description=f"{algorithm.name} {method} heatmap overlay"[:64],
        coding_schemes=[codes.CODING_SCHEME],
        **{k: v for k, v in algorithm.equipment().items() if k != "manufacturer"})
    if "ImageOrientationPatient" not in source:  # projections: as the source says (e.g. A\FR), or empty (Type 2C)
        sc.PatientOrientation = list(source.PatientOrientation) if source.get("PatientOrientation") else None
    parametric_map.copy_anatomy(sc, source)
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = f"{method} heatmap blended on the source image"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    code = dcm_codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code.value, code.scheme_designator, \
        code.meaning
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    return sc
