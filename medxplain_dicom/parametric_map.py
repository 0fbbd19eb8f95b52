"""A heatmap as a DICOM Parametric Map (highdicom): float32 pixels equal to the map, on the source's grid.

Frames follow the source: one frame for a mammogram (its Rows x Columns), one per source slice for
an MRI series (``DicomSource.to_frames``), each with the source slice's plane position,
orientation and pixel spacing and the same frame of reference, so viewers overlay it on the study.
A projection source has no frame of reference: see :mod:`medxplain_dicom.headers` for the
detector-plane frame the map then declares. Values are stored as FloatPixelData, exactly the
engine's float32 map; the Real World Value Mapping is the identity (slope 1, intercept 0, no units)
and says so, since relevance has no physical unit.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from medxplain_dicom import codes
from medxplain_dicom.algorithm import Algorithm


def copy_anatomy(target: Dataset, source: Dataset) -> None:
    """BodyPartExamined and General Series Laterality (Type 2C, paired organs) as the source states them.

    Laterality is the source's image or series laterality; without one it is left out when the body part
    is named (validators then know whether it is paired) and empty (unknown) otherwise.
    """
    if source.get("BodyPartExamined"):
        target.BodyPartExamined = source.BodyPartExamined
    value = source.get("ImageLaterality") or source.get("Laterality")
    if value in ("L", "R"):
        target.Laterality = value
    elif source.get("BodyPartExamined"):
        if "Laterality" in target:
            del target.Laterality
    else:
        target.Laterality = None


def window(frames: np.ndarray) -> hd.VOILUTTransformation:
    """A display window over the map's range; LINEAR_EXACT since relevance ranges are often narrower than 1."""
    lo, hi = float(frames.min()), float(frames.max())
    return hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6),
                                   window_explanation="relevance range", voi_lut_function="LINEAR_EXACT")


def identity_mapping(method: str, frames: np.ndarray) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=method[:16], lut_explanation=f"{method} relevance as computed (identity mapping)"[:64],
        unit=codes.NO_UNITS, value_range=(float(frames.min()), float(frames.max())), slope=1.0, intercept=0.0,
        quantity_definition=codes.RELEVANCE)


def build(sources: list[Dataset], frames: np.ndarray, method: str, algorithm: Algorithm, *,
          series_uid: str, sop_uid: str, series_number: int) -> hd.pm.ParametricMap:
    """``frames`` (n, rows, cols) float32, frame ``f`` on ``sources[f]`` (headers from :mod:`headers`)."""
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] != len(sources):
        raise ValueError("one map frame per source image is needed")
    if frames.shape[1:] != (int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError("the map does not have the source image's rows and columns")
    frames = np.where(np.isfinite(frames), frames, np.float32(0))  # as the JSON encodings do (docs/api.md)
    pm = hd.pm.ParametricMap(
        sources, frames, series_uid, series_number, sop_uid, 1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[identity_mapping(method, frames)],
        voi_lut_transformations=[window(frames)],
        content_label="HEATMAP", content_description=f"{method} heatmap ({algorithm.name})"[:64],
        series_description=f"{algorithm.name} {method} heatmap (parametric map)"[:64],
        coding_schemes=[codes.CODING_SCHEME], **algorithm.equipment())
    copy_anatomy(pm, sources[0])
    _derive_dimension_organization_uid(pm, sop_uid)
    # Float pixel data has no image compression in DICOM; the deflated transfer syntax is the one the
    # IOD allows and cuts a smooth map ~3-4x (5.1 -> 1.4 MB for a 1.3 Mpx mammogram's map), so online
    # answers fit the response budget (medxplain_engine/budget.py) and PACS storage shrinks alike.
    pm.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return pm


def _derive_dimension_organization_uid(pm: hd.pm.ParametricMap, sop_uid: str) -> None:
    """highdicom draws the Dimension Organization UID at random; derive it from the object's own
    (deterministic) SOP Instance UID instead, so that the same input gives the same object: a repeated
    STOW stores identical content, and the two runtimes' objects can be compared."""
    uid = generate_uid(entropy_srcs=[sop_uid, "dimension-organization"])
    for item in pm.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = uid
    for item in pm.DimensionIndexSequence:
        item.DimensionOrganizationUID = uid
