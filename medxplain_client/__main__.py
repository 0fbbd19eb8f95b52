"""``python -m medxplain_client predict|explain``: send one scan, print a summary, write the maps.

Exit codes: 0 done, 2 the request was refused (4xx: bad input, parameter or token) or the command
line is wrong, 1 the server failed or could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
                       help="mammogram (PNG/DICOM) or MRI volume (NIfTI)")
        if name == "explain":
            p.add_argument("--explain", metavar="METHODS",
                           help="comma list, e.g. cam,gradcam (default: the model's default methods)")
        p.add_argument("--top-k", type=int, help="number of ranked units (server default 8)")
        p.add_argument("--target", help="class to explain, name or index (default: the predicted class)")
        p.add_argument("--unit-maps", action="store_true", help="also return the top units' activation maps")
        p.add_argument("--url", default=os.environ.get("MEDXPLAIN_URL", "http://127.0.0.1:8080"),
                       help="REST inference address (default: $MEDXPLAIN_URL or %(default)s)")
        p.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at this address instead of REST")
        p.add_argument("--token-file", type=Path, metavar="key_file.json",
                       help="TorchServe key file (default: $MEDXPLAIN_TOKEN)")
        p.add_argument("--out", type=Path, default=Path("medxplain-output"),
                       help="folder for the JSON and map files (default: %(default)s)")
        p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    try:
        token = read_token(args.token_file) if args.token_file else None
    except ValueError as err:
        parser.error(str(err))
    params = {"top_k": args.top_k, "target": args.target, "unit_maps": args.unit_maps or None}
    try:
        with Client(base_url=args.url, grpc_target=args.grpc, token=token, timeout=args.timeout,
                    transport="grpc" if args.grpc else "rest") as client:
            if args.command == "explain":
                result = client.explain(args.model, args.input, methods=args.explain, **params)
            else:
                result = client.predict(args.model, args.input, **params)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.is_client_fault else 1
    written = write_outputs(result, args.out, f"{_stem(args.input)}.{args.model}")
    print(summary(result, written))
    return 0


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
