"""The model bundle: one directory holding everything a trained model needs at inference time.

The same directory is what ``torch-model-archiver`` packs into a ``.mar`` and what TorchServe (or
the batch job) unpacks again, so training, serving and batch agree on one format:

    model.json          kind, name, version, class names, architecture config
    weights.pt          state dict (plain tensors; torch.load(weights_only=True) reads it)
    model_card.json     version, weights sha256, training data and metrics
    unit_labels.json    experts' concept labels per unit of the explained layer
    MRI only: mean.nii.gz, std.nii.gz, brain_mask.nii.gz  (per-voxel z-scoring travels with the
              weights: the seed never saved them, which made its checkpoint unusable on new scans)
              atlas.nii.gz, atlas_labels.csv (regions for area occlusion and region reports)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medxplain_contract.integrity import sha256_file
from medxplain_models.adni import ADNIConfig, ClassificationModel3D
from medxplain_models.atlas import Region, load_atlas, write_atlas
from medxplain_models.ddsm import DDSMConfig, DDSMResNet

BUNDLE_FORMAT = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
MODEL_CARD = "model_card.json"
UNIT_LABELS = "unit_labels.json"
_STD_FLOOR = 1e-3  # voxels that never vary in training would otherwise divide by ~0


@dataclass
class MRIPreprocessing:
    """Per-voxel z-scoring on the template grid; data and affine travel together (as in nibabel)."""

    mean: np.ndarray
    std: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)  # type: ignore[return-value]

    def normalise(self, volume: np.ndarray) -> np.ndarray:
        """0 means 'the training mean at this voxel', which is also the occlusion fill value."""
        z = (volume.astype(np.float32) - self.mean) / np.maximum(self.std, _STD_FLOOR)
        return np.where(self.brain_mask, z, 0.0).astype(np.float32)

    def save(self, directory: Path) -> None:
        for name, data in (("mean", self.mean), ("std", self.std), ("brain_mask", self.brain_mask.astype(np.uint8))):
            nib.save(nib.Nifti1Image(data, self.affine), directory / f"{name}.nii.gz")

    @classmethod
    def load(cls, directory: Path) -> MRIPreprocessing:
        mean = nib.load(directory / "mean.nii.gz")
        return cls(mean=np.asarray(mean.dataobj, dtype=np.float32),
                   std=np.asarray(nib.load(directory / "std.nii.gz").dataobj, dtype=np.float32),
                   brain_mask=np.asarray(nib.load(directory / "brain_mask.nii.gz").dataobj) > 0,
                   affine=mean.affine.copy())


@dataclass
class Atlas:
    labels: np.ndarray
    regions: list[Region]

    def save(self, directory: Path, affine: np.ndarray) -> None:
        write_atlas(directory / "atlas.nii.gz", directory / "atlas_labels.csv", self.labels, self.regions, affine)

    @classmethod
    def load(cls, directory: Path) -> Atlas:
        labels, regions = load_atlas(directory / "atlas.nii.gz", directory / "atlas_labels.csv")
        return cls(labels=labels, regions=regions)


@dataclass
class ModelBundle:
    kind: str  # "ddsm" | "adni"
    name: str
    version: str
    class_names: list[str]
    model: nn.Module
    card: dict = field(default_factory=dict)
    unit_labels: dict = field(default_factory=dict)
    preprocessing: MRIPreprocessing | None = None
    atlas: Atlas | None = None
    # Operating points chosen on held-out data (model_store.calibrate), e.g. full_image_threshold.
    decision: dict = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / WEIGHTS)
        meta = {"format": BUNDLE_FORMAT, "kind": self.kind, "name": self.name, "version": self.version,
                "class_names": list(self.class_names), "config": self.model.config.to_dict()}
        if self.decision:
            meta["decision"] = self.decision
        _write_json(directory / MODEL_JSON, meta)
        card = {**self.card, "name": self.name, "version": self.version,
                "weights_sha256": sha256_file(directory / WEIGHTS)}
        _write_json(directory / MODEL_CARD, card)
        _write_json(directory / UNIT_LABELS, self.unit_labels or {"units": {}})
        if self.preprocessing is not None:
            self.preprocessing.save(directory)
            if self.atlas is not None:
                self.atlas.save(directory, self.preprocessing.affine)
        return directory

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> ModelBundle:
        """Read a bundle; the model's weights are loaded straight onto ``device`` (numpy volumes stay on the host)."""
        directory = Path(directory)
        meta = json.loads((directory / MODEL_JSON).read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{directory}: unsupported bundle format {meta.get('format')}")
        model = build_model(meta["kind"], meta["config"]).to(device)
        state = torch.load(directory / WEIGHTS, map_location=device, weights_only=True)
        model.load_state_dict(state)
        model.eval()
        bundle = cls(kind=meta["kind"], name=meta["name"], version=meta["version"],
                     class_names=list(meta["class_names"]), model=model,
                     card=_read_json(directory / MODEL_CARD), unit_labels=_read_json(directory / UNIT_LABELS),
                     decision=meta.get("decision", {}))
        if meta["kind"] == "adni":
            bundle.preprocessing = MRIPreprocessing.load(directory)
            if (directory / "atlas.nii.gz").exists():
                bundle.atlas = Atlas.load(directory)
        return bundle


def build_model(kind: str, config: dict) -> nn.Module:
    if kind == "ddsm":
        return DDSMResNet(DDSMConfig(**config))
    if kind == "adni":
        return ClassificationModel3D(ADNIConfig.from_dict(config))
    raise ValueError(f"unknown model kind {kind!r}")


def content_digest(directory: Path) -> str:
    """sha256 over the sorted (path, file sha256) list of an archive's payload.

    TorchServe hands a handler the unpacked archive, never the ``.mar`` itself, and the ``.mar``
    zip carries timestamps; so the archive identity reported in every response is this content
    digest, which is equal for the ``.mar`` (see :func:`mar_digest`) and its unpacked directory.
    """
    lines = [f"{p.relative_to(directory).as_posix()} {sha256_file(p)}"
             for p in sorted(directory.rglob("*")) if p.is_file() and _is_payload(p.relative_to(directory).as_posix())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def mar_digest(mar_path: Path) -> str:
    """The same digest as :func:`content_digest`, computed without unpacking the archive."""
    with zipfile.ZipFile(mar_path) as zf:
        lines = [f"{name} {hashlib.sha256(zf.read(name)).hexdigest()}"
                 for name in sorted(n for n in zf.namelist() if not n.endswith("/") and _is_payload(n))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _is_payload(relative: str) -> bool:
    return not relative.startswith("MAR-INF/") and "__pycache__" not in relative


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
