"""One result -> its DICOM objects: [SR, then per heatmap a Parametric Map and an RGB Secondary Capture].

Every object is built before any is returned (a failure raises; there is no partial list), so a
caller that stores the list stores all of an item's objects or none. The objects join the source's
study (patient and study identity copied from the source header), each in a new series, with
UIDs derived from the source SOP Instance UIDs, the archive digest, the request key, the object
kind and the method: the same input, archive and options give the same UIDs, so a repeated STOW
replaces instead of duplicating. Nothing from the headers is logged here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medxplain_contract.dicom_source import DicomSource
from medxplain_contract.errors import UnprocessableInput
from medxplain_dicom import headers, overlay, parametric_map, report
from medxplain_dicom.algorithm import Algorithm

__all__ = ["Algorithm", "render_objects"]

SERIES_NUMBERS = {"sr": 9900, "pm": 9910, "sc": 9930}  # high numbers keep derived series after the acquisitions


def _uids(source: DicomSource, algorithm: Algorithm, request_key: str, kind: str, method: str) -> tuple[str, str]:
    sources = [str(ds.SOPInstanceUID) for ds in source.datasets]
    base = [*sources, algorithm.archive_digest, request_key, kind, method]
    return generate_uid(entropy_srcs=[*base, "series"]), generate_uid(entropy_srcs=[*base, "instance"])


def _frames(source: DicomSource, grid: np.ndarray, method: str) -> np.ndarray:
    """The map on the sent grid -> (frames, rows, cols) float32 aligned with the source headers."""
    grid = np.asarray(grid, dtype=np.float32)
    if grid.shape != source.display.shape:
        raise ValueError(f"the {method} map is not on the sent image's grid")
    return source.to_frames(grid)


# highdicom logs at INFO which source dataset it copies from, by SOP Instance UID: identifiers stay out of
# logs, so only its errors pass (set once at import; its module loggers inherit the level).
logging.getLogger("highdicom").setLevel(logging.ERROR)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def _values_withheld() -> Iterator[None]:
    """pydicom warns *and* logs with the offending value quoted ("Invalid value for VR DA: '...'"); header
    values are patient data, so while the builders run its warnings are ignored and its log records below
    ERROR dropped (highdicom's records, which name source UIDs, are held at ERROR for good: above)."""
    logger, quiet = logging.getLogger("pydicom"), _BelowError()
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(quiet)


def render_objects(response: dict, source: DicomSource, maps: dict[str, np.ndarray], algorithm: Algorithm,
                   request_key: str) -> list[Dataset]:
    """The DICOM objects of one result (see the module docstring); maps are method -> float map on the sent grid."""
    with _values_withheld():
        return _render(response, source, maps, algorithm, request_key)


def _render(response: dict, source: DicomSource, maps: dict[str, np.ndarray], algorithm: Algorithm,
            request_key: str) -> list[Dataset]:
    if not source.datasets:
        raise UnprocessableInput("dicom_source_incomplete", "the DICOM source has no image headers")
    identity = [headers.identity_ready(ds) for ds in source.datasets]
    geometry = [headers.detector_plane(ds) for ds in identity]
    frames = {method: _frames(source, grid, method) for method, grid in maps.items()}
    display = source.to_frames(np.asarray(source.display, dtype=np.float32))

    series, sop = _uids(source, algorithm, request_key, "sr", "")
    objects: list[Dataset] = [report.build(response, identity, algorithm, series_uid=series, sop_uid=sop,
                                           series_number=SERIES_NUMBERS["sr"])]
    for n, (method, stack) in enumerate(frames.items()):
        series, sop = _uids(source, algorithm, request_key, "pm", method)
        objects.append(parametric_map.build(geometry, stack, method, algorithm, series_uid=series, sop_uid=sop,
                                            series_number=SERIES_NUMBERS["pm"] + n))
        peak = overlay.peak_frame(stack)
        series, sop = _uids(source, algorithm, request_key, "sc", method)
        objects.append(overlay.build(identity[peak], display[peak], stack[peak], method, algorithm,
                                     series_uid=series, sop_uid=sop, series_number=SERIES_NUMBERS["sc"] + n))
    return objects
