"""``python -m model_store``: synthetic data, training, checkpoint import, archives and evaluation
(explanation quality: ``evaluate``; the full-mammogram decision: ``evaluate-images``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

SYNTH_PROFILES = {
    # demo: enough data for AUC >= 0.95 within the ~10 min training budget; test: seconds.
    "ddsm": {"demo": {"n_cases": 150, "height": 1400, "width": 908},
             "test": {"n_cases": 30, "height": 700, "width": 454}},
    "adni": {"demo": {"n_subjects": 160, "resolution_mm": 2},
             "test": {"n_subjects": 80, "resolution_mm": 2}},
}


def _synth(args: argparse.Namespace) -> None:
    settings = dict(SYNTH_PROFILES[args.dataset][args.profile])
    if args.n is not None:
        settings["n_cases" if args.dataset == "ddsm" else "n_subjects"] = args.n
    if args.dataset == "ddsm":
        from model_store.synth.mammo import generate_dataset
    else:
        from model_store.synth.mri import generate_dataset
    out = generate_dataset(args.out, seed=args.seed, **settings)
    print(f"wrote {out}")


def _train(args: argparse.Namespace) -> None:
    from model_store.train import BarNotMet, train

    try:
        report = train(args.model, args.data, args.out, args.profile, epochs=args.epochs, depth=args.depth,
                       threads=args.threads)
    except BarNotMet as err:  # no bundle is written: a later `make` must not take it for a trained model
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    test, val = report["test"], report["validation"]
    print(json.dumps({"model": args.model, "bundle": str(args.out), "train_seconds": report["train_seconds"],
                      "macro_roc_auc": test["macro_roc_auc"], "roc_auc": test["roc_auc"],
                      "accuracy": test["accuracy"], "validation_macro_roc_auc": val["macro_roc_auc"],
                      "validation_bar": val["bar"], "threads": report["torch_threads"]}, indent=2))


def _archive(args: argparse.Namespace) -> None:
    from model_store.archive import build_archive

    mar = build_archive(args.bundle, args.out, model_name=args.name, unit_labels=args.unit_labels,
                        include_demo_answers=args.include_demo_answers, device_type=args.device_type)
    print(f"wrote {mar}")


def _import(args: argparse.Namespace) -> None:
    from model_store.importer import import_seed_checkpoint

    out = import_seed_checkpoint(args)
    print(f"wrote bundle {out}")


def _digest(args: argparse.Namespace) -> None:
    from medxplain_models.bundle import content_digest, mar_digest

    print(mar_digest(args.path) if args.path.is_file() else content_digest(args.path))


def _verify(args: argparse.Namespace) -> None:
    from medxplain_contract.integrity import signing_key, verify_archive

    key = signing_key()
    for mar in args.archives:
        print(f"{mar}: OK {verify_archive(mar, key)}{' (signed)' if key else ''}")


def _calibrate(args: argparse.Namespace) -> None:
    from medxplain_models.bundle import ModelBundle
    from model_store.calibrate import calibrate_ddsm

    bundle = ModelBundle.load(args.bundle)
    if bundle.kind != "ddsm":
        raise ValueError("calibration sets the full-mammogram operating point: ddsm bundles only")
    decision = calibrate_ddsm(bundle, args.data, args.split, score=args.score)
    bundle.save(args.bundle)
    print(json.dumps(decision, indent=2))


def _evaluate_images(args: argparse.Namespace) -> None:
    from model_store.image_level import evaluate_images, record, to_markdown

    report = evaluate_images(args.bundle, args.data, args.split, args.limit)
    if not args.no_record:
        record(args.bundle, report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(to_markdown(report))


def _evaluate(args: argparse.Namespace) -> None:
    from model_store.evaluate import EvalConfig, evaluate, to_markdown

    def methods(value: str | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(m for m in value.split(",") if m and m != "none")

    config = EvalConfig(split=args.split, limit=args.limit, methods=methods(args.methods),
                        patch_methods=methods(args.patch_methods), full_cascade=args.cascade, ig_steps=args.ig_steps,
                        occlusion_size=args.occlusion_size, occlusion_stride=args.occlusion_stride,
                        curve_steps=args.curve_steps, gradcam_layer=args.gradcam_layer)
    report = evaluate(args.model, args.bundle, args.data, config)
    if args.card:
        from model_store.quality_card import write_card

        write_card(args.bundle, report)
    markdown = to_markdown(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown)
    print(markdown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_store", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a deterministic synthetic data set with ground-truth masks")
    p.add_argument("dataset", choices=["ddsm", "adni"])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--profile", choices=["demo", "test"], default="demo", help="size preset")
    p.add_argument("-n", type=int, help="number of cases (ddsm) or subjects (adni), overrides the profile")
    p.add_argument("--seed", type=int, default=2018)
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a model on a synthetic data set and write a model bundle")
    p.add_argument("--model", choices=["ddsm", "adni"], required=True)
    p.add_argument("--data", type=Path, required=True, help="folder written by `synth`")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--profile", choices=["demo", "test"], default="demo")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 101, 152], help="ResNet depth (ddsm)")
    p.add_argument("--threads", type=int, help="torch threads (default 2; fixed and recorded in metrics.json)")
    p.set_defaults(func=_train)

    p = sub.add_parser("archive", help="pack a bundle into a TorchServe .mar")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model store folder")
    p.add_argument("--name", help="model name (default: the bundle's)")
    p.add_argument("--unit-labels", type=Path, help="consensus unit-label file to ship instead of the bundle's "
                   "(refused if it holds demo-mode answers)")
    p.add_argument("--include-demo-answers", action="store_true",
                   help="ship a unit-label file that holds demo-mode (not logged-in) answers")
    p.add_argument("--device-type", choices=["cpu", "gpu"], default="cpu",
                   help="model-config.yaml deviceType: gpu releases get deviceType: gpu + deviceIds: [0] "
                        "(docs/deploy.md); default cpu")
    p.set_defaults(func=_archive)

    p = sub.add_parser("import", help="turn a seed checkpoint (DeepMiner .pth.tar / cnn-interpretability state dict) into a bundle")
    p.add_argument("--kind", choices=["ddsm", "adni"], required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name")
    p.add_argument("--version", default="1.0")
    p.add_argument("--pooling", choices=["max", "avg"], default="max", help="ddsm: global pooling the weights were trained with")
    p.add_argument("--preprocessing", type=Path,
                   help="adni: folder with mean.nii.gz, std.nii.gz, brain_mask.nii.gz (and optionally atlas.nii.gz + atlas_labels.csv)")
    p.set_defaults(func=_import)

    p = sub.add_parser("digest", help="print the content digest of a .mar or an unpacked archive folder")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_digest)

    p = sub.add_parser("verify", help="check .mar files against their published <name>.mar.sha256 (and signature)")
    p.add_argument("archives", type=Path, nargs="+")
    p.set_defaults(func=_verify)

    p = sub.add_parser("calibrate", help="ddsm: choose the full-mammogram per-class thresholds on a held-out split")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle to update (e.g. an imported checkpoint)")
    p.add_argument("--data", type=Path, required=True, help="folder with images.csv (path, split, label columns)")
    p.add_argument("--split", default="val", help="the split to calibrate on, or 'all' for a calibration set "
                   "generated apart from the training data (default: val)")
    p.add_argument("--score", choices=["window", "position"], default="window",
                   help="class map the image score is the maximum of: patch-sized windows (default) or single "
                        "layer4 cells (DeepMiner's map)")
    p.set_defaults(func=_calibrate)

    about = ("ddsm: image-level figures of the served full-mammogram decision (macro ROC AUC, accuracy, per-class "
             "recall, confusion matrix), into metrics.json and the model card")
    p = sub.add_parser("evaluate-images", help=about, description=about)
    p.add_argument("--bundle", type=Path, required=True, help="model bundle (or unpacked .mar folder) to evaluate")
    p.add_argument("--data", type=Path, required=True, help="folder with images.csv (path, split, label, case_id)")
    p.add_argument("--split", default="test", help="the split to score, or 'all' for a set held out from "
                   "training as a whole (default: test)")
    p.add_argument("--limit", type=int, help="first N images of the split only")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--no-record", action="store_true", help="do not write into the bundle's metrics.json / card")
    p.set_defaults(func=_evaluate_images)

    p = sub.add_parser("evaluate", help="score the attribution methods against the synthetic ground-truth masks")
    p.add_argument("--model", choices=["ddsm", "adni"], required=True)
    p.add_argument("--bundle", type=Path, required=True, help="model bundle or unpacked .mar folder")
    p.add_argument("--data", type=Path, required=True, help="folder written by `synth`")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="at most N lesion images / AD subjects")
    p.add_argument("--methods", help="comma list for full images / volumes (default: ddsm all but "
                   "integrated_gradients and occlusion, adni all)")
    p.add_argument("--patch-methods", help="ddsm: comma list for lesion patches (default: all; 'none' skips them)")
    p.add_argument("--cascade", action="store_true", help="report every randomisation step, not just top and full")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--occlusion-size", type=int, help="default: ddsm engine default; adni 40 mm in voxels")
    p.add_argument("--occlusion-stride", type=int, help="default: ddsm engine default; adni 12 mm in voxels")
    p.add_argument("--curve-steps", type=int, default=10,
                   help="deletion / insertion curve steps (default 10; 0 skips the curves)")
    p.add_argument("--gradcam-layer", help="Grad-CAM's layer (adni relu_1..relu_4, ddsm layer1..layer4; "
                   "default the last)")
    p.add_argument("--card", action="store_true", help="write each method's sanity flag and scores into the "
                   "bundle's model_card.json (served in the method descriptions; archive afterwards)")
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--markdown", type=Path, help="markdown report")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
