"""Bring-your-own-weights: wrap a seed checkpoint into a model bundle that archives and serves.

The MRI model additionally needs the per-voxel normalisation volumes and brain mask of its
training set (the seed never saved them); without them its inputs would be meaningless, so the
import refuses to guess.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medxplain_models.adni import CLASS_NAMES as ADNI_CLASSES
from medxplain_models.bundle import Atlas, ModelBundle, MRIPreprocessing
from medxplain_models.ddsm import CLASS_NAMES as DDSM_CLASSES
from model_store.checkpoints import CheckpointError, import_checkpoint


def import_seed_checkpoint(args: argparse.Namespace) -> Path:
    card = {"imported_from": args.checkpoint.name,
            "intended_use": "as stated by the owner of the imported weights"}
    if args.kind == "ddsm":
        model = import_checkpoint(args.checkpoint, "ddsm", pooling=args.pooling)
        bundle = ModelBundle(kind="ddsm", name=args.name or "ddsm", version=args.version,
                             class_names=list(DDSM_CLASSES), model=model, card=card)
        return bundle.save(args.out)
    if args.preprocessing is None:
        raise CheckpointError("--preprocessing is required for adni: the folder with the training set's "
                              "mean.nii.gz, std.nii.gz and brain_mask.nii.gz")
    prep = MRIPreprocessing.load(args.preprocessing)
    model = import_checkpoint(args.checkpoint, "adni", input_shape=prep.shape)
    atlas = Atlas.load(args.preprocessing) if (args.preprocessing / "atlas.nii.gz").exists() else None
    bundle = ModelBundle(kind="adni", name=args.name or "adni", version=args.version,
                         class_names=list(ADNI_CLASSES), model=model, card=card, preprocessing=prep, atlas=atlas)
    return bundle.save(args.out)
