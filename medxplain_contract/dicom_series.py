"""A DICOM series (one file per slice) -> a volume and its NIfTI (RAS+) affine, checked from the headers first.

Written with pydicom + numpy rather than a library's series reader because every refusal must come
before the pixels are decoded and must say why: highdicom 0.28's ``get_volume_from_series`` decodes all
slices to float64 before anything is bounded and reports a gap, a duplicate and an oblique stack alike
as "not a volume"; nibabel.nicom has no multi-file series assembly. The tests check the result against
highdicom's (same slice order, same geometry).

Geometry (DICOM PS3.3 C.7.6.2): slice files are sorted by their position along the slice normal
``row direction x column direction``, so the stack is right-handed as NIfTI volumes usually are. The
volume indexes (column, row, slice) like nibabel: ``data[i, j, k]`` is column ``i``, row ``j`` of slice
``k`` and ``datasets[k]`` is slice ``k`` (what ``DicomSource.to_frames`` assumes). The affine maps
voxel centres to RAS+ millimetres, ``RAS = diag(-1, -1, 1) @ LPS``, so a series and the NIfTI of the
same volume take the same resampling path.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from medxplain_contract import dicom
from medxplain_contract.errors import InputError, PayloadTooLarge

MAX_SERIES_FILES = 2048  # a 1 mm head is ~200-400 slices
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-4  # direction cosines are decimal strings: equal orientations agree to ~1e-6
_SPACING_RTOL = 0.01  # slice spacing regularity, as highdicom's default


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    """A multi-valued decimal attribute of exactly ``count`` finite numbers, or an input error naming it."""
    try:
        value = ds[keyword].value if keyword in ds else None
        numbers = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except Exception:  # noqa: BLE001 -- malformed decimal strings, a single value, any pydicom conversion error
        numbers = None
    if numbers is None:
        raise InputError("missing_geometry", f"a slice has no usable {keyword}: an MRI series needs the image "
                         "plane attributes (ImagePositionPatient, ImageOrientationPatient, PixelSpacing)")
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise InputError("bad_dicom_attribute", f"DICOM attribute {keyword} is malformed")
    return numbers


def _read_headers(files: list[bytes], max_inflated: int) -> list[Dataset]:
    if not files:
        raise InputError("incomplete_series", "the series has no DICOM files")
    if len(files) > MAX_SERIES_FILES:
        raise PayloadTooLarge("series_too_large", f"the series has {len(files)} files; at most "
                              f"{MAX_SERIES_FILES} slices are accepted")
    datasets = []
    for index, data in enumerate(files):
        if len(data) < 132 or data[128:132] != b"DICM":
            raise InputError("not_dicom", f"file {index + 1} of the series is not a DICOM file")
        try:
            datasets.append(dicom.read_dataset(data, max_inflated))
        except InputError as err:  # name the slice; the message stays the library-free one
            raise type(err)(err.code, f"file {index + 1} of the series: {err.message}") from None
    return datasets


def _check_consistent(datasets: list[Dataset]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """One series, one frame of reference, one plane size, spacing and orientation -> (rows, cols, spacing, iop)."""
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise InputError("mixed_series", "the files belong to more than one series: send one series per request")
    if len({str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}) > 1:
        raise InputError("mixed_series", "the slices do not share one frame of reference")
    if len({str(ds.get("SOPClassUID", "")) for ds in datasets}) > 1:
        raise InputError("mixed_series", "the files are of more than one kind of DICOM object")
    sizes = {(dicom.int_attribute(ds, "Rows"), dicom.int_attribute(ds, "Columns")) for ds in datasets}
    if len(sizes) > 1:
        raise InputError("mixed_series", "the slices differ in Rows x Columns")
    rows, cols = sizes.pop()
    spacing = [_floats(ds, "PixelSpacing", 2) for ds in datasets]
    orientation = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    if not all(np.allclose(s, spacing[0], rtol=1e-5, atol=1e-6) for s in spacing):
        raise InputError("mixed_series", "the slices differ in PixelSpacing")
    if not all(np.allclose(o, orientation[0], rtol=0, atol=_ORIENTATION_TOL) for o in orientation):
        raise InputError("mixed_series", "the slices differ in ImageOrientationPatient")
    iop = orientation[0]
    row_dir, col_dir = iop[:3], iop[3:]
    if (np.any(spacing[0] <= 0) or abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(float(row_dir @ col_dir)) > 1e-3):
        raise InputError("bad_geometry", "ImageOrientationPatient or PixelSpacing does not describe a plane")
    for ds in datasets:
        if dicom.int_attribute(ds, "SamplesPerPixel", 1) != 1:
            raise InputError("unsupported_dicom", "only greyscale (one sample per pixel) slices are supported")
    return rows, cols, spacing[0], iop


def _stack(datasets: list[Dataset], iop: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Slice order along the normal, first position and the step between slices (LPS mm); gaps refused."""
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    normal = np.cross(iop[:3], iop[3:])
    depth = positions @ normal
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    positions, depth = positions[order], depth[order]
    gaps = np.diff(depth)
    if np.any(gaps < 1e-3):
        raise InputError("irregular_series", "two slices of the series share one position: send one series "
                         "(one echo, one time point)")
    step = (positions[-1] - positions[0]) / (len(order) - 1)
    unit = float(np.median(gaps))
    if not np.allclose(gaps, unit, rtol=_SPACING_RTOL, atol=0):
        ratio = gaps / gaps.min()
        if np.allclose(ratio, np.round(ratio), rtol=0, atol=0.05):
            missing = round(float(ratio.sum())) - len(gaps)
            raise InputError("incomplete_series", f"the series has gaps: {missing} slice(s) missing between "
                             f"{len(order)} received; send the whole series")
        raise InputError("irregular_series", "the slices are not evenly spaced")
    expected = positions[0] + np.arange(len(order))[:, None] * step
    if np.abs(positions - expected).max() > _SPACING_RTOL * unit + 1e-3:
        raise InputError("irregular_series", "the slice positions do not lie on one line")
    return order, positions[0], step


def geometry(datasets: list[Dataset]) -> tuple[list[int], int, int, np.ndarray]:
    """Header-only: (slice order, rows, cols, RAS+ affine of data[column, row, slice]); no pixel is decoded."""
    rows, cols, spacing, iop = _check_consistent(datasets)
    if len(datasets) < 2:
        raise InputError("incomplete_series", "one slice is not a volume: send the whole series (at least 2 "
                         "slices) or a NIfTI file")
    order, origin, step = _stack(datasets, iop)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]  # column index i runs along the row direction, PixelSpacing[1] apart
    lps[:3, 1] = iop[3:] * spacing[0]  # row index j along the column direction, PixelSpacing[0] apart
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return order, rows, cols, LPS_TO_RAS @ lps


def assemble(files: list[bytes], max_voxels: int, max_inflated: int) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    """DICOM files of one series (any order) -> (data[column, row, slice] float32, RAS+ affine, headers by slice).

    Every header is read and checked, and the declared Rows x Columns x slices bounded by ``max_voxels``,
    before any pixel data is decoded; ``max_inflated`` caps each (deflated) file. The headers keep
    everything but their pixel data (``decoding.decode_series`` wraps them in a ``DicomSource``).
    """
    from pydicom.pixels import apply_modality_lut

    datasets = _read_headers(files, max_inflated)
    rows, cols = (dicom.int_attribute(datasets[0], k) for k in ("Rows", "Columns"))
    if rows * cols * len(datasets) > max_voxels:  # before the geometry work and any decoding
        raise PayloadTooLarge("series_too_large", f"the series declares {cols}x{rows}x{len(datasets)} voxels, "
                              f"more than {max_voxels}")
    order, rows, cols, affine = geometry(datasets)
    if min(rows, cols) < 2:
        raise InputError("wrong_dimensions", "every axis of the volume needs at least 2 voxels")
    datasets = [datasets[k] for k in order]
    data = np.empty((cols, rows, len(datasets)), dtype=np.float32)
    for k, ds in enumerate(datasets):
        dicom.check_codestream(ds, rows, cols)
        try:
            with dicom.quiet():
                pixels = apply_modality_lut(ds.pixel_array, ds)
        except MemoryError:
            raise PayloadTooLarge("series_too_large", "the series pixel data does not fit in memory") from None
        except Exception:  # noqa: BLE001 -- pydicom raises many types for broken or undecodable pixel data
            raise InputError("corrupt_dicom", f"could not decode the pixel data of slice {k + 1} (transfer "
                             f"syntax {dicom.transfer_syntax_name(ds)})") from None
        if pixels.shape != (rows, cols):
            raise InputError("corrupt_dicom", f"the pixel data of slice {k + 1} does not match Rows x Columns")
        data[:, :, k] = pixels.T
        if not np.isfinite(data[:, :, k]).all():  # e.g. a RescaleSlope of 1e308
            raise InputError("non_finite_values", f"slice {k + 1} has NaN or infinite values after its rescale")
        del ds.PixelData  # each slice's bytes are released once decoded
    return data, affine, datasets
