"""What DICOM outputs cost per image: ``medxplain_dicom.render_objects`` next to the engine's JSON serialise.

For a full-size synthetic mammogram (the DICOM of BUILD/data/ddsm/dicom/) and an MRI series (a
volume of BUILD/data/adni on the model grid, as one MR header per slice), with 1 and 2 heatmaps:
the engine runs in-process on the demo archive (``Engine.from_model_dir`` on the unpacked .mar),
its response's ``timing_ms.serialise`` (maps to the sent frame, encoded, the JSON body built) and
its whole wall time are recorded, then ``render_objects`` builds the SR, parametric maps and
overlays from that very response and its maps. Engine call and render alternate round by round, so
contention hits both alike; medians of N rounds are printed with the ratios render / serialise and
render / whole engine call (the extra time per image that ``output=dicom`` adds).

The MRI headers are built here (pydicom, MR Image Storage, the volume's affine as per-slice
positions): render_objects reads headers only, never source pixels. A source DICOM written before
synthetic mammograms carried ImagerPixelSpacing gets the value the current writer would give it.
``--no-engine`` times render alone on random maps (no archive needed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from medxplain_contract.decoding import decode_image
from medxplain_contract.dicom_source import DicomSource
from medxplain_contract.encodings import decode_map
from medxplain_dicom.render import Algorithm, render_objects
from model_store.synth.mammo import DETECTOR_HEIGHT_MM

METHODS = {"ddsm": (("cam",), ("cam", "gradcam")), "adni": (("gradcam",), ("gradcam", "guided_backprop"))}


@dataclass
class Case:
    name: str
    model: str
    payload: bytes
    source: DicomSource


def mammo_case(path: Path) -> Case:
    data = path.read_bytes()
    image = decode_image(data)
    source = image.source
    if source is None:  # before the DICOM input path keeps headers (issue 14 section 2)
        source = DicomSource([pydicom.dcmread(path, stop_before_pixels=True)], image.pixels.astype(np.float32))
    ds = source.datasets[0]
    if "ImagerPixelSpacing" not in ds and "PixelSpacing" not in ds:
        ds.ImagerPixelSpacing = [f"{DETECTOR_HEIGHT_MM / int(ds.Rows):.6f}"] * 2
    return Case("mammogram (DICOM)", "ddsm", data, source)


def mr_headers(affine: np.ndarray, shape: tuple[int, int, int]) -> list[Dataset]:
    """One MR header per k-slice of a RAS+ grid (LPS positions), made-up identity, deterministic UIDs."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    study, series, frame = (generate_uid(entropy_srcs=["bench-dicom", x]) for x in ("study", "series", "for"))
    out = []
    for k in range(shape[2]):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid(entropy_srcs=["bench-dicom", str(k)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^MR", "BENCH-1", "19400101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "090000", "BENCH-ACC", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1])]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.Rows, ds.Columns = shape[1], shape[0]
        out.append(ds)
    return out


def mri_case(path: Path) -> Case:
    import nibabel as nib

    image = nib.load(str(path))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    source = DicomSource(mr_headers(image.affine, volume.shape), volume)
    return Case(f"MRI series ({volume.shape[2]} slices)", "adni", path.read_bytes(), source)


def algorithm_of(response: dict, model: str) -> Algorithm:
    meta = response.get("model") or {}
    return Algorithm(meta.get("name", model), str(meta.get("version", "1.0")), meta.get("archive_digest", "0" * 64),
                     str((meta.get("engine") or {}).get("version", "0")))


PLACEHOLDER = {"prediction": {"label": "x", "label_index": 0, "probabilities": {"x": 1.0}}}  # --no-engine


def timed(call, *args) -> tuple[float, object]:
    started = time.perf_counter()
    out = call(*args)
    return (time.perf_counter() - started) * 1000, out


def bench_case(case: Case, engine, methods: tuple[str, ...], n: int) -> dict:
    """n rounds of (engine call, render of its result); medians in ms."""
    from medxplain_engine.engine import EngineRequest

    serialise, whole, render, size, count = [], [], [], 0, 0
    rng = np.random.default_rng(0)
    request = [EngineRequest(case.payload, {"explain": ",".join(methods)})]
    for i in range(n + 1):  # round 0 warms both sides up and is not counted
        response = PLACEHOLDER
        maps = {m: rng.random(case.source.display.shape, dtype=np.float32) for m in methods}
        if engine is not None:
            ms, (response,) = timed(engine.run, request)
            if not isinstance(response, dict):
                raise SystemExit(f"the engine refused the {case.name}: {response}")
            if i:
                whole.append(ms)
                serialise.append(response["timing_ms"]["serialise"])
            maps = {m: decode_map(response["heatmaps"][m]) for m in methods}
        ms, objects = timed(render_objects, response, case.source, maps, algorithm_of(response, case.model), f"r{i}")
        count = len(objects)
        if i:
            render.append(ms)
        if i == 1:
            size = sum(len(pydicom_bytes(o)) for o in objects)
    med = statistics.median
    return {"case": case.name, "maps": len(methods), "render": med(render), "objects": count, "bytes": size,
            "serialise": med(serialise) if serialise else None, "whole": med(whole) if whole else None}


def pydicom_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load_engine(mar: Path, tmp: Path):
    from medxplain_engine.engine import Engine

    model_dir = tmp / mar.stem
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    return Engine.from_model_dir(model_dir)


def print_rows(rows: list[dict]) -> None:
    print(f"{'input':28} {'maps':>4} {'objects':>7} {'MB':>6} {'render ms':>10} {'serialise ms':>12} "
          f"{'engine ms':>10} {'render/serialise':>16} {'render/engine':>13}")
    for r in rows:
        ser, whole = r["serialise"], r["whole"]
        print(f"{r['case']:28} {r['maps']:>4} {r['objects']:>7} {r['bytes'] / 2**20:>6.1f} {r['render']:>10.1f} "
              f"{ser if ser is not None else float('nan'):>12.1f} {whole if whole is not None else float('nan'):>10.1f} "
              f"{r['render'] / ser if ser else float('nan'):>16.2f} {r['render'] / whole if whole else float('nan'):>13.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_dicom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("build"), help="the build folder (default: build)")
    parser.add_argument("--mammogram", type=Path, help="default: BUILD/data/ddsm/dicom/<first>.dcm")
    parser.add_argument("--volume", type=Path, help="a NIfTI volume (default: BUILD/data/adni/images/<first>)")
    parser.add_argument("-n", type=int, default=5, help="timed rounds per case (median)")
    parser.add_argument("--no-engine", action="store_true", help="render random maps only, without the archives")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mammogram = args.mammogram or min((args.build / "data" / "ddsm" / "dicom").glob("*.dcm"))
    volume = args.volume or min((args.build / "data" / "adni" / "images").glob("*.nii*"))
    cases = [mammo_case(mammogram), mri_case(volume)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        for case in cases:
            engine = None if args.no_engine else load_engine(args.build / "model-store" / f"{case.model}.mar",
                                                             Path(tmp))
            for methods in METHODS[case.model]:
                rows.append(bench_case(case, engine, methods, args.n))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
