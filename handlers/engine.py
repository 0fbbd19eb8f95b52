"""The inference engine: decode -> validate -> preprocess -> forward -> postprocess.

TorchServe handlers, the batch job and the tests all call this module, so online and batch results
for the same bytes are produced by the same code. Nothing here knows about TorchServe.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from nibabel.processing import resample_from_to
import nibabel as nib
from PIL import Image

from handlers.decoding import decode_image, decode_volume
from handlers.errors import InputError
from model_store.bundle import ModelBundle, content_digest
from model_store.models.ddsm import FULL_IMAGE_SHORT_SIDE, PATCH_SIZE
from model_store.preprocess import ddsm_normalise

log = logging.getLogger(__name__)
API_VERSION = "1"


@dataclass
class EngineRequest:
    """One item of a batch: the file's bytes plus the request parameters."""

    payload: bytes
    params: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A decoded, validated input ready for the forward pass."""

    tensor: torch.Tensor
    mode: str
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Engine(ABC):
    kind: str

    def __init__(self, bundle: ModelBundle, archive_digest: str) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.archive_digest = archive_digest

    @staticmethod
    def from_model_dir(model_dir: Path) -> "Engine":
        """Load an unpacked archive (TorchServe's model_dir or the batch job's extraction)."""
        model_dir = Path(model_dir)
        bundle = ModelBundle.load(model_dir)
        engine_cls = {"ddsm": DDSMEngine, "adni": ADNIEngine}[bundle.kind]
        return engine_cls(bundle, content_digest(model_dir))

    def model_info(self) -> dict:
        return {"name": self.bundle.name, "version": self.bundle.version, "archive_digest": self.archive_digest,
                "weights_sha256": self.bundle.card.get("weights_sha256")}

    def run(self, requests: list[EngineRequest]) -> list[dict | InputError]:
        """One result per request, in order; a bad item yields its error without failing the others."""
        prepared: list[Prepared | InputError] = []
        for req in requests:
            try:
                prepared.append(self.prepare(req))
            except InputError as err:
                prepared.append(err)
        results: list[dict | InputError] = list(prepared)  # errors stay in place
        for mode in {p.mode for p in prepared if isinstance(p, Prepared)}:
            idx = [i for i, p in enumerate(prepared) if isinstance(p, Prepared) and p.mode == mode]
            outputs = self.forward(mode, [prepared[i] for i in idx])  # type: ignore[misc]
            for i, out in zip(idx, outputs):
                results[i] = self.respond(prepared[i], out)  # type: ignore[arg-type]
        return results

    def respond(self, item: Prepared, probabilities: np.ndarray, extra: dict | None = None) -> dict:
        names = self.bundle.class_names
        label = int(np.argmax(probabilities))
        return {"api_version": API_VERSION, "model": self.model_info(),
                "prediction": {"label": names[label], "label_index": label,
                               "probabilities": {n: float(p) for n, p in zip(names, probabilities)}},
                "input": item.meta, **(extra or {}), "warnings": item.warnings}

    @abstractmethod
    def prepare(self, request: EngineRequest) -> Prepared: ...

    @abstractmethod
    def forward(self, mode: str, items: list[Prepared]) -> list[np.ndarray]: ...


class DDSMEngine(Engine):
    kind = "ddsm"

    def prepare(self, request: EngineRequest) -> Prepared:
        image = decode_image(request.payload)
        h, w = image.pixels.shape
        meta = {"format": image.source_format, "bits": image.bits, "height": h, "width": w}
        if (h, w) == (PATCH_SIZE, PATCH_SIZE):
            return Prepared(ddsm_normalise(torch.from_numpy(image.pixels)[None]), "patch", {**meta, "mode": "patch"})
        scale = FULL_IMAGE_SHORT_SIDE / min(h, w)
        size = (max(PATCH_SIZE, round(w * scale)), max(PATCH_SIZE, round(h * scale)))
        resized = np.asarray(Image.fromarray(image.pixels, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)
        return Prepared(ddsm_normalise(torch.from_numpy(resized)[None]), "full", {**meta, "mode": "full_image",
                                                                                  "analysed_size": list(size[::-1])})

    @torch.inference_mode()
    def forward(self, mode: str, items: list[Prepared]) -> list[np.ndarray]:
        if mode == "patch":
            logits = self.model(torch.cat([p.tensor for p in items]))
            return list(torch.softmax(logits, dim=1).numpy())
        out = []
        for item in items:  # full images differ in size: one pass each
            prob_map = self.model.full_image_probabilities(item.tensor)[0]  # (classes, h, w)
            # DeepMiner's image score per class is the map's maximum; the reported distribution is
            # the one at the most suspicious position (lowest 'normal' probability).
            flat = prob_map.flatten(1)
            where = int(torch.argmin(flat[0]))
            item.meta["class_scores"] = {n: float(s) for n, s in zip(self.bundle.class_names, flat.amax(dim=1))}
            item.meta["map_shape"] = list(prob_map.shape[1:])
            out.append(flat[:, where].numpy())
        return out


class ADNIEngine(Engine):
    kind = "adni"

    def prepare(self, request: EngineRequest) -> Prepared:
        volume = decode_volume(request.payload)
        prep = self.bundle.preprocessing
        assert prep is not None
        warnings = list(volume.warnings)
        data = volume.data
        on_grid = data.shape == prep.shape and np.allclose(volume.affine, prep.affine, atol=1e-3)
        if not on_grid:
            data = self._resample(volume.data, volume.affine)
            warnings.append(f"input of shape {list(volume.data.shape)} was resampled onto the model's "
                            f"{list(prep.shape)} template grid; results are only meaningful for scans "
                            "registered to the template (MNI-152)")
        tensor = torch.from_numpy(prep.normalise(data))[None, None]
        meta = {"format": "nifti", "shape": list(volume.data.shape), "resampled": not on_grid,
                "affine": np.round(volume.affine, 6).tolist()}
        return Prepared(tensor, "volume", meta, warnings)

    def _resample(self, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        prep = self.bundle.preprocessing
        assert prep is not None
        if not self._overlaps(data.shape, affine):
            raise InputError("volume_not_placeable",
                             "the volume does not overlap the model's template space: register it to MNI-152 first")
        src = nib.Nifti1Image(data, affine)
        return np.asarray(resample_from_to(src, (prep.shape, prep.affine), order=1).dataobj, dtype=np.float32)

    def _overlaps(self, shape: tuple[int, ...], affine: np.ndarray) -> bool:
        """The input's world bounding box must cover most of the template's brain."""
        prep = self.bundle.preprocessing
        assert prep is not None

        def box(shp, aff):
            corners = np.array([[i, j, k, 1] for i in (0, shp[0] - 1) for j in (0, shp[1] - 1) for k in (0, shp[2] - 1)])
            world = corners @ aff.T
            return world[:, :3].min(0), world[:, :3].max(0)

        (a_lo, a_hi), (b_lo, b_hi) = box(shape, affine), box(prep.shape, prep.affine)
        inter = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None).prod()
        return bool(inter >= 0.5 * (b_hi - b_lo).prod())

    @torch.inference_mode()
    def forward(self, mode: str, items: list[Prepared]) -> list[np.ndarray]:
        logits = self.model(torch.cat([p.tensor for p in items]))
        return list(torch.softmax(logits, dim=1).numpy())
