"""Full-image fine-tuning of the mammography classifier by multiple-instance learning (MIL).

The patch classifier is trained on tiles: all lesion tiles plus a few random normal tiles per
image. Applied to every position of a full mammogram, its image score (the class map's maximum)
is decided by the hardest position of the image - dense glandular tissue, the pectoral edge - which
random normal tiles rarely show, so normal and benign images get confused at full scale even when
patches are classified well. MIL fixes that where it arises: each training image is a bag of
instances (the positions of the class map the decision reads, ``medxplain_models.decision``) with only
the image label known; the image's score for lesion class c is the maximum over its instances of
P(c), and a binary cross-entropy on those maxima (normal images: every lesion score low; a class-c
image: the c score high, the other lesion score low) trains the classifier on the instances that
decide, while the patch cross-entropy on the training patches keeps a patch's class unchanged in
meaning.

Only the classifier (fc, DeepMiner's 1x1 convolution of the class map) is refit; the backbone is
frozen. So each training image costs one forward pass, the units of ``layer4`` keep their meaning
(the experts' unit labels stay valid), and the instances' features can be cached once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medxplain_engine.engine import EngineRequest
from medxplain_engine.mammo import DDSMEngine
from medxplain_models.bundle import ModelBundle
from medxplain_models.decision import PATCH_WINDOW
from medxplain_models.preprocess import ddsm_normalise
from model_store.synth.mammo import read_images_csv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MILConfig:
    steps: int = 400
    lr: float = 3e-3
    image_batch: int = 16
    patch_batch: int = 64
    image_weight: float = 1.0  # weight of the image (MIL) loss next to the patch loss
    score: str = "window"  # the class map the decision reads (medxplain_models.decision)
    window: int = PATCH_WINDOW
    max_normal_ratio: float = 2.0  # at most this many normal images per lesion image (cost bound)
    seed: int = 0


@dataclass
class Bags:
    """Cached instances: per image the (instances, units) features the class map is applied to."""

    features: list[torch.Tensor]
    labels: np.ndarray


@torch.inference_mode()
def image_bags(bundle: ModelBundle, data_dir: Path, split: str, cfg: MILConfig, progress: bool = True) -> Bags:
    """One forward per image of ``split``: the serving engine's own prepare and forward stages."""
    rows = [r for r in read_images_csv(data_dir) if r["split"] == split]
    rng = np.random.default_rng(cfg.seed)
    lesion = [r for r in rows if r["label"] > 0]
    normal = [r for r in rows if r["label"] == 0]
    keep = int(max(1, cfg.max_normal_ratio * len(lesion)))
    if len(normal) > keep:
        normal = [normal[i] for i in np.sort(rng.choice(len(normal), keep, replace=False))]
    rows = sorted(lesion + normal, key=lambda r: r["image_id"])
    engine = DDSMEngine(bundle, archive_digest="")
    features = []
    for row in tqdm(rows, desc=f"MIL bags ({split})", unit="image", disable=not progress):
        prepared = engine.prepare(EngineRequest((Path(data_dir) / row["path"]).read_bytes(), {"top_k": 0}))
        fmap = engine.forward(prepared.mode, [prepared])[0].feature_map[None]  # the engine's infer, unisolated
        if cfg.score == "window":
            fmap = F.max_pool2d(fmap, min(cfg.window, *fmap.shape[-2:]), stride=1)
        features.append(fmap[0].flatten(1).T.to(torch.float16).clone())  # (instances, units)
    return Bags(features, np.array([r["label"] for r in rows], dtype=np.int64))


@torch.inference_mode()
def patch_features(bundle: ModelBundle, patches: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Pooled ``layer4`` vectors of uint8 patches (N, 227, 227): the fc's input in patch mode."""
    model = bundle.model.eval()
    out = [model.pool(model.features(ddsm_normalise(torch.from_numpy(patches[i:i + batch_size]).float() / 255.0)))
           for i in range(0, len(patches), batch_size)]
    return torch.cat(out)


def mil_loss(logits: torch.Tensor, label: int) -> torch.Tensor:
    """BCE on each lesion class's maximum probability over the bag (instances, classes)."""
    lesion_max = torch.softmax(logits, dim=1)[:, 1:].amax(dim=0).clamp(1e-6, 1 - 1e-6)
    target = torch.zeros_like(lesion_max)
    if label > 0:
        target[label - 1] = 1.0
    return F.binary_cross_entropy(lesion_max, target)


def finetune_classifier(fc: nn.Linear, bags: Bags, patch_x: torch.Tensor, patch_y: np.ndarray,
                        cfg: MILConfig, progress: bool = True) -> dict:
    """Refit the classifier ``fc`` in place on the patch loss + the image (MIL) loss; returns a summary."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(fc.parameters(), lr=cfg.lr)
    n_classes = fc.out_features
    # Class-balanced sampling of images and patches: normal ones dominate both.
    image_p = 1.0 / np.bincount(bags.labels, minlength=n_classes)[bags.labels]
    patch_p = 1.0 / np.bincount(patch_y, minlength=n_classes)[patch_y]
    patch_t = torch.from_numpy(patch_y)
    history = []
    started = time.monotonic()
    with torch.enable_grad():
        for step in tqdm(range(cfg.steps), desc="MIL fine-tuning", unit="step", disable=not progress, leave=False):
            images = rng.choice(len(bags.labels), cfg.image_batch, p=image_p / image_p.sum())
            patches = rng.choice(len(patch_y), cfg.patch_batch, p=patch_p / patch_p.sum())
            optimizer.zero_grad(set_to_none=True)
            patch_loss = F.cross_entropy(fc(patch_x[patches]), patch_t[patches])
            image_loss = torch.stack([mil_loss(fc(bags.features[i].float()), int(bags.labels[i]))
                                      for i in images]).mean()
            loss = patch_loss + cfg.image_weight * image_loss
            loss.backward()
            optimizer.step()
            history.append((patch_loss.item(), image_loss.item()))
    tail = np.mean(history[-max(1, cfg.steps // 10):], axis=0)
    log.info("MIL fine-tuning: %d steps, final patch loss %.3f, image loss %.3f", cfg.steps, *tail)
    return {"config": asdict(cfg), "images": np.bincount(bags.labels, minlength=n_classes).tolist(),
            "patches": len(patch_y), "final_patch_loss": round(float(tail[0]), 4),
            "final_image_loss": round(float(tail[1]), 4), "seconds": round(time.monotonic() - started, 1),
            "trained": "fc only (backbone frozen)"}


def finetune_full_image(bundle: ModelBundle, data_dir: Path, patches: np.ndarray, patch_y: np.ndarray,
                        cfg: MILConfig, progress: bool = True) -> dict:
    """Train-split bags + pooled training patches -> refit fc; the stage ``train_ddsm`` runs after patches."""
    started = time.monotonic()
    bags = image_bags(bundle, data_dir, "train", cfg, progress)
    patch_x = patch_features(bundle, patches)
    summary = finetune_classifier(bundle.model.fc, bags, patch_x, patch_y, cfg, progress)
    summary["seconds_total"] = round(time.monotonic() - started, 1)
    return summary

