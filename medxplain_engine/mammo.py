"""The mammography half of the engine (DeepMiner): 227 px patches and full mammograms.

A 227x227 image is a patch, classified as is. Anything else is a full mammogram: its shorter side
is resized to 908 px (4 x 227, so patches keep their scale) and the fully-convolutional class map
gives one distribution per position; ``input.class_scores`` holds each class's map maximum, and the
label is the calibrated decision (``medxplain_models.decision``) when the bundle has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from medxplain_contract.decoding import decode_image
from medxplain_contract.encodings import encode_2d
from medxplain_engine.attribution import DDSM_DEFAULT, DDSM_METHODS, ExplainContext
from medxplain_engine.engine import Engine, Geometry2D, Inference, Prepared
from medxplain_engine.options import RequestOptions
from medxplain_models.bundle import ModelBundle
from medxplain_models.ddsm import FULL_IMAGE_SHORT_SIDE, PATCH_SIZE, SpeedSettings, fused_trunk
from medxplain_models.decision import decide, image_scores
from medxplain_models.preprocess import ddsm_normalise


class PatchScore(nn.Module):
    """Grey patch (N, 1, H, W) -> class logits: what attributions explain for patches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(ddsm_normalise(grey[:, 0])))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """layer4 map -> scores: what incremental occlusion (medxplain_engine/occlusion2d.py) applies."""
        return self.model.fc(self.model.pool(fmap))


class FullImageScore(PatchScore):
    """Grey full image -> per-class maximum of the class map (DeepMiner's image score, as logits)."""

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.model.class_map(fmap).amax(dim=(2, 3))


class DDSMEngine(Engine):
    kind = "ddsm"
    methods = DDSM_METHODS
    default_methods = DDSM_DEFAULT
    weight_source = "classifier"
    gradcam_layers = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages; layer4 = the units' layer
    peak_window = 7  # ~ one 227 px patch at layer4's stride of 32 px

    def __init__(self, bundle: ModelBundle, archive_digest: str, device: torch.device | str = "cpu",
                 amp: bool = False) -> None:
        super().__init__(bundle, archive_digest, device, amp)
        self.scores = {"patch": PatchScore(self.model), "full": FullImageScore(self.model)}
        self.trunk: Callable[[torch.Tensor], torch.Tensor] = self.model.features  # the forward pass's layer4 map
        self.speedups = SpeedSettings()

    def apply_speed_settings(self, settings: dict) -> dict:
        """CPU speed-ups from ``handler:`` (model_store/configs/ddsm.yaml; measured by devstack.bench_fullimage).

        ``channels_last`` stores the weights NHWC (oneDNN's native layout: every method gets faster);
        ``fused_forward`` runs the prediction's forward pass on a conv-BN-folded copy (torch.fx), which
        explanations (they need the BatchNorm modules' hooks and gradients) do not use; ``warm_up``
        runs one patch and one full mammogram here so kernel set-up does not land on the first request.
        Results stay within float32 rounding of eager (the bench prints the differences).
        """
        self.speedups = SpeedSettings.from_dict(settings)
        if self.speedups.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.speedups.fused_forward:
            self.trunk = fused_trunk(self.model, self.speedups.channels_last)
        started = time.perf_counter()
        if self.speedups.warm_up:
            for mode, size in (("patch", (PATCH_SIZE, PATCH_SIZE)), ("full", (FULL_IMAGE_SHORT_SIDE, 1400))):
                self.forward(mode, [Prepared(torch.zeros(1, 1, *size, device=self.device), mode, self.options({}), Geometry2D(size, size))])
        return {**self.speedups.to_dict(), "warm_up_s": round(time.perf_counter() - started, 2)}

    def decode(self, payload: bytes, options: RequestOptions) -> Prepared:
        image = decode_image(payload)
        h, w = image.pixels.shape
        meta = {"format": image.source_format, "bits": image.bits, "height": h, "width": w}
        if (h, w) == (PATCH_SIZE, PATCH_SIZE):
            return Prepared(torch.from_numpy(image.pixels)[None, None], "patch", options, Geometry2D((h, w), (h, w)),
                            {**meta, "mode": "patch"}, source=image.source)
        scale = FULL_IMAGE_SHORT_SIDE / min(h, w)
        size = (max(PATCH_SIZE, round(w * scale)), max(PATCH_SIZE, round(h * scale)))  # PIL order: (cols, rows)
        self.budget.check_image(h, w, (size[1], size[0]))  # before the resize allocates it
        resized = np.array(Image.fromarray(image.pixels).resize(size, Image.BILINEAR), dtype=np.float32)
        return Prepared(torch.from_numpy(resized)[None, None], "full", options, Geometry2D((h, w), (size[1], size[0])),
                        {**meta, "mode": "full_image", "analysed_size": [size[1], size[0]]}, source=image.source)

    @torch.inference_mode()
    def forward(self, mode: str, items: list[Prepared]) -> list[Inference]:
        if mode == "patch":
            fmap = self.trunk(ddsm_normalise(torch.cat([p.inputs for p in items])[:, 0]))
            probs = torch.softmax(self.model.fc(self.model.pool(fmap)), dim=1).float().cpu().numpy()
            return [Inference(p, f.clone(), int(np.argmax(p))) for p, f in zip(probs, fmap)]
        return [self._full_image(item) for item in items]  # full images differ in size: one pass each

    def _full_image(self, item: Prepared) -> Inference:
        fmap = self.trunk(ddsm_normalise(item.inputs[:, 0]))
        prob_map = torch.softmax(self.model.class_map(fmap), dim=1)[0].flatten(1)  # (classes, positions)
        # The image score per class is the map's maximum (DeepMiner); the reported distribution
        # is the one at the most suspicious position (lowest 'normal' probability).
        probabilities = prob_map[:, int(torch.argmin(prob_map[0]))].float().cpu().numpy()
        class_scores = prob_map.amax(dim=1)
        decision = self.bundle.decision
        if decision:
            served = class_scores if decision.get("score", "position") == "position" else image_scores(
                self.model, fmap, decision)
            decision = decide(served, decision, self.bundle.class_names)
        label = int(decision["label_index"]) if decision else int(np.argmax(probabilities))
        return Inference(probabilities, fmap[0].clone(), label, decision or None,
                         {n: float(s) for n, s in zip(self.bundle.class_names, class_scores)},
                         prob_map.reshape(-1, *fmap.shape[2:]).clone())

    def image_scores(self, inference: Inference, rule: dict) -> list[float]:
        """Per-class image scores of a full image under a decision ``rule`` (calibration tries candidate rules)."""
        with torch.inference_mode():
            return [float(s) for s in image_scores(self.model, inference.feature_map[None], rule)]

    def inference_meta(self, inference: Inference) -> dict:
        if inference.class_scores is None:
            return {}
        return {"class_scores": inference.class_scores, "map_shape": list(inference.feature_map.shape[1:])}

    @property
    def unit_class_weights(self) -> torch.Tensor:
        return self.model.fc.weight

    def output_elements(self, item: Prepared) -> int:
        h, w = item.geometry.size
        return int(h) * int(w)

    def explain_context(self, item: Prepared, inference: Inference) -> ExplainContext:
        return ExplainContext(score_model=self.scores[item.mode], explained_layer=self.explained_layer(item.options),
                              inputs=item.inputs.clone(), feature_map=inference.feature_map,
                              class_weights=self.model.fc.weight.detach())

    def unit_scores(self, ctx, inference, target):
        activations = inference.feature_map.flatten(1).amax(dim=1).cpu().numpy()
        return activations, self.model.fc.weight[target].detach().cpu().numpy()

    def to_sent_frame(self, item: Prepared, maps: np.ndarray) -> np.ndarray:
        """Bilinear back from the analysed size to the sent image's pixels (as the input was resized)."""
        h, w = item.geometry.size
        if maps.shape[1:] == (h, w):
            return maps
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(
            (w, h), Image.BILINEAR)) for m in maps])

    def encode_sent(self, item, maps, names, shared_scale):
        lo, hi = (float(maps.min()), float(maps.max())) if shared_scale else (None, None)
        return {n: encode_2d(m, item.options.encoding, lo, hi) for n, m in zip(names, maps)}
