"""``python -m medxplain_client predict|explain``: send one scan, print a summary, write the maps.

``--output dicom`` (a DICOM input: a mammogram file, or an MRI series as a zip or a folder) asks for the
derived DICOM objects instead (a TID 1500 SR, and per heatmap a Parametric Map and an RGB overlay) from
TorchServe's REST API or, with ``--oip``, the KServe runtime's REST or gRPC API, writes them as .dcm
files and, with ``--stow URL``, stores them in a PACS over DICOMweb STOW-RS (credentials from
MEDXAI_DICOMWEB_USERNAME / MEDXAI_DICOMWEB_PASSWORD, or their *_FILE variants, or
MEDXAI_DICOMWEB_ENV_FILE; never on the command line).

Exit codes: 0 done, 2 the request was refused (4xx: bad input, parameter or token), the PACS refused
the credentials, or the command line is wrong, 1 the server or the PACS failed or could not be reached.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

from pydicom import dcmread

from medxplain_client.client import Client, read_token
from medxplain_client.errors import ClientError
from medxplain_client.outputs import write_outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medxplain_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("predict", "prediction and top units"), ("explain", "prediction plus heatmaps")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--model", required=True, help="model name on the server, e.g. ddsm or adni")
        p.add_argument("--input", required=True, type=Path, metavar="FILE",
                       help="mammogram (PNG/DICOM) or MRI volume (NIfTI; a DICOM series as a .zip or a folder)")
        if name == "explain":
            p.add_argument("--explain", metavar="METHODS",
                           help="comma list, e.g. cam,gradcam (default: the model's default methods)")
        p.add_argument("--top-k", type=int, help="number of ranked units (server default 8)")
        p.add_argument("--target", help="class to explain, name or index (default: the predicted class)")
        p.add_argument("--unit-maps", action="store_true", help="also return the top units' activation maps")
        p.add_argument("--url", default=os.environ.get("MEDXPLAIN_URL", "http://127.0.0.1:8080"),
                       help="REST inference address (default: $MEDXPLAIN_URL or %(default)s)")
        p.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at this address instead of REST")
        p.add_argument("--oip", action="store_true", help="speak the Open Inference Protocol v2 (the KServe "
                       "runtime, python -m medxplain_kserve) instead of TorchServe's APIs")
        p.add_argument("--token-file", type=Path, metavar="key_file.json",
                       help="TorchServe key file (default: $MEDXPLAIN_TOKEN)")
        p.add_argument("--out", type=Path, default=Path("medxplain-output"),
                       help="folder for the JSON and map files (default: %(default)s)")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request")
        p.add_argument("--output", choices=("json", "dicom"), default="json",
                       help="json: the response and map files; dicom: the derived DICOM objects (needs a DICOM "
                       "input; TorchServe's REST API, or with --oip the KServe runtime's REST or gRPC)")
        p.add_argument("--stow", metavar="URL",
                       help="with --output dicom: store the objects in this DICOMweb service (STOW-RS), "
                       "e.g. http://pacs:8042/dicom-web")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.input.is_file() or args.input.is_dir()):
        parser.error(f"--input {args.input}: no such file or folder")
    if args.input.is_dir() and args.model != "adni":
        parser.error("--input: a folder is an MRI DICOM series (model adni)")
    if args.stow and args.output != "dicom":
        parser.error("--stow needs --output dicom")
    if args.output == "dicom" and args.grpc and not args.oip:
        parser.error("--output dicom: TorchServe's gRPC API answers JSON only (use its REST API, or --oip)")
    try:
        token = read_token(args.token_file) if args.token_file else None
    except ValueError as err:
        parser.error(str(err))
    params = {"top_k": args.top_k, "target": args.target, "unit_maps": args.unit_maps or None}
    payload = series_zip(args.input) if args.input.is_dir() else args.input
    if args.output == "dicom":
        return _dicom(args, token, payload, params)
    try:
        with _client(args, token) as client:
            if args.command == "explain":
                result = client.explain(args.model, payload, methods=args.explain, **params)
            else:
                result = client.predict(args.model, payload, **params)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.is_client_fault else 1
    written = write_outputs(result, args.out, f"{_stem(args.input)}.{args.model}")
    print(summary(result, written))
    return 0


def _dicom(args: argparse.Namespace, token: str | None, payload: Path | bytes, params: dict) -> int:
    """--output dicom [--stow URL]: the PACS is checked first (a wrong password costs no inference), then the
    objects are written, then stored (all of them, or a non-zero exit)."""
    from medxplain_contract import dicomweb

    if params.get("unit_maps"):
        print("error: --unit-maps are not rendered as DICOM objects", file=sys.stderr)
        return 2
    try:
        pacs = dicomweb.connect(args.stow, dicomweb.DicomwebConfig.from_env()) if args.stow else None
    except dicomweb.PacsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (dicomweb.PacsAuthError, dicomweb.PacsConfigError)) else 1
    methods = (args.explain or "default") if args.command == "explain" else None
    try:
        with _client(args, token) as client:
            parts = client.dicom(args.model, payload, methods=methods, **params)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.is_client_fault else 1
    written = write_dicom(parts, args.out, f"{_stem(args.input)}.{args.model}")
    for path in written:
        print(f"  wrote {path}")
    if pacs is not None:
        try:
            dicomweb.store(pacs, [dcmread(io.BytesIO(part)) for part in parts])
        except dicomweb.PacsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2 if isinstance(err, dicomweb.PacsAuthError) else 1
        print(f"  stored {len(parts)} object(s) in {dicomweb.display_url(args.stow)}")
    return 0


def _client(args: argparse.Namespace, token: str | None) -> Client:
    return Client(base_url=args.url, grpc_target=args.grpc, token=token, timeout=args.timeout,
                  transport=("oip-" if args.oip else "") + ("grpc" if args.grpc else "rest"))


def series_zip(folder: Path) -> bytes:
    """An MRI series folder as the zip body the server takes (its .dcm files, or every file when none end so)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm") or \
        sorted(p for p in folder.iterdir() if p.is_file())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i, path in enumerate(files):
            archive.writestr(f"{i:05d}.dcm", path.read_bytes())  # numbered: file names may identify patients
    return buffer.getvalue()


def write_dicom(parts: list[bytes], out_dir: Path, stem: str) -> list[Path]:
    """One .dcm file per object, named by order and kind (sr, pm, sc): never by anything inside the object."""
    kinds = {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.88.33": "sr",
             "1.2.840.10008.5.1.4.1.1.88.22": "sr", "1.2.840.10008.5.1.4.1.1.30": "pm",
             "1.2.840.10008.5.1.4.1.1.7": "sc"}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, part in enumerate(parts):
        sop_class = str(dcmread(io.BytesIO(part), stop_before_pixels=True).SOPClassUID)
        path = out_dir / f"{stem}.{i:02d}-{kinds.get(sop_class, 'dicom')}.dcm"
        path.write_bytes(part)
        written.append(path)
    return written


def summary(result: dict, written: list[Path]) -> str:
    pred = result["prediction"]
    probs = sorted(pred["probabilities"].items(), key=lambda kv: -kv[1])
    lines = [f"{result['model']['name']} {result['model']['version']}: {pred['label']}",
             "  probabilities: " + ", ".join(f"{name} {p:.3f}" for name, p in probs)]
    if result.get("target", {}).get("label") != pred["label"]:
        lines.append(f"  explained class: {result['target']['label']}")
    units = result.get("units") or []
    if units:
        lines.append("  top units: " + ", ".join(
            f"#{u['unit']} ({u['contribution']:+.3g}{', ' + '/'.join(u['labels']) if u['labels'] else ''})"
            for u in units[:5]))
    lines += [f"  warning: {w}" for w in result.get("warnings", [])]
    lines += [f"  wrote {path}" for path in written]
    return "\n".join(lines)


def _stem(path: Path) -> str:
    return path.name[:-7] if path.name.lower().endswith(".nii.gz") else path.stem

if __name__ == "__main__":
    sys.exit(main())
