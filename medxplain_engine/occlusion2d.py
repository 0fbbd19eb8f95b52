"""2D occlusion of the DDSM ResNet (Captum ``Occlusion`` semantics) by incremental inference.

Semantics are Captum's, which the engine served before (``occlusion_map_reference``): square windows
start at 0, stride, ..., ceil((n - size) / stride) * stride along each axis, the last one truncated at
the border; the grey input under a window is set to 0; a pixel's relevance is the mean score drop of
the windows covering it. The score is the class logit of a patch or the class map's maximum of a full
mammogram (``DDSMEngine.scores``: their ``head`` is applied to the ``layer4`` map).

Hand-written because Captum recomputes the whole network for every window. As in
``medxplain_engine/occlusion3d.py`` (Nakandala et al., SIGMOD 2019), a window changes only the
activations in its projection through each layer: the unoccluded stage inputs are cached once and,
per batch of windows, the stem and every residual block are recomputed only on the box of their
output that can change, from a crop of their cached input with the previous stage's recomputed box
pasted in. Zero padding at the map borders is reproduced exactly (crops are zero outside the map and
intermediate maps are zeroed outside their true extent), so the map equals the full recomputation
up to float32 rounding. The windows of a batch share one box extent per stage (boxes only grow:
extra outputs are recomputed from unchanged inputs). Deep nets gain less: a box grows by one cell
per 3x3 conv, so ResNet-152's 36 ``layer3`` blocks cover a whole 908 px mammogram there and that
stage is recomputed in full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

DEFAULT_BATCH = 16  # windows per incremental batch
REFERENCE_BATCH = 8  # Captum's perturbations_per_eval (the engine's setting before)

Head = Callable[[torch.Tensor], torch.Tensor]  # (B, units, h, w) layer4 map -> (B, classes) scores
Normalise = Callable[[torch.Tensor], torch.Tensor]  # (N, H, W) grey -> (N, 3, H, W) network input


# --- geometry ------------------------------------------------------------------------------------

def window_starts(n: int, size: int, stride: int) -> np.ndarray:
    """Captum's window starts along one axis: ceil((n - size) / stride) + 1 of them."""
    return np.arange(int(np.ceil((n - size) / stride)) + 1) * stride


def window_boxes(shape: tuple[int, int], size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) corners (n, 2) of every window in Captum's order (first axis slowest), truncated at the border."""
    rows, cols = (window_starts(n, size, stride) for n in shape)
    lo = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    return lo, np.minimum(lo + size, np.array(shape))


def relevance_map(shape: tuple[int, int], lo: np.ndarray, hi: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """Mean drop of the windows covering each pixel (Captum's ``total / count``)."""
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for (r0, c0), (r1, c1), drop in zip(lo, hi, drops):
        total[r0:r1, c0:c1] += float(drop)
        count[r0:r1, c0:c1] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


@dataclass(frozen=True)
class Op:
    """A conv-like step (kernel, stride, padding), the same on both spatial axes."""

    k: int
    s: int
    p: int

    def out_size(self, n: np.ndarray) -> np.ndarray:
        return (n + 2 * self.p - self.k) // self.s + 1

    def changed(self, lo: np.ndarray, hi: np.ndarray, n_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outputs reading any input in [lo, hi): output o reads inputs o*s - p .. o*s - p + k - 1."""
        out_lo = np.maximum(-((self.k - 1 - self.p - lo) // self.s), 0)  # ceil((lo + p - k + 1) / s)
        out_hi = np.minimum((hi - 1 + self.p) // self.s + 1, n_out)
        return out_lo, np.maximum(out_hi, out_lo)

    def needed(self, lo: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input box (corner, extent) that outputs [lo, lo + extent) read; it may leave the map (padding)."""
        return lo * self.s - self.p, (extent - 1) * self.s + self.k


IDENTITY = Op(1, 1, 0)


def _op(conv: nn.Conv2d) -> Op:
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError("incremental occlusion supports square, undilated, ungrouped convolutions")
    return Op(conv.kernel_size[0], conv.stride[0], conv.padding[0])


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conv without padding (the crop carries it), then the module's own BatchNorm (eval: affine)."""
    return lambda x: bn(F.conv2d(x, conv.weight, conv.bias, conv.stride, 0))


class Stage:
    """The stem or one residual block: conv-like steps (ReLU between them), optionally + a shortcut, ReLU."""

    def __init__(self, block: nn.Module | tuple[nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d]) -> None:
        self.module = block
        if isinstance(block, (BasicBlock, Bottleneck)):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
            if isinstance(block, Bottleneck):
                pairs.append((block.conv3, block.bn3))
            self.steps = [(_op(c), _conv_bn(c, b)) for c, b in pairs]
            self.relu_after = [True] * (len(pairs) - 1) + [False]  # the last ReLU follows the addition
            self.residual = True
            ds = block.downsample
            self.shortcut = None if ds is None else (_op(ds[0]), _conv_bn(ds[0], ds[1]))
        else:
            conv, bn, pool = block
            k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
            # max-pool padding is -inf, but its input is post-ReLU (>= 0) and every window holds a real input,
            # so padding with the zeros the crop carries gives the same maxima
            self.steps = [(_op(conv), _conv_bn(conv, bn)), (Op(k, s, p), lambda x: F.max_pool2d(x, k, s))]
            self.relu_after = [True, False]
            self.residual, self.shortcut = False, None

    @property
    def shortcut_op(self) -> Op:
        return self.shortcut[0] if self.shortcut else IDENTITY

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The stage on a whole map with the network's own modules (what the cache holds)."""
        if self.residual:
            return self.module(x)
        conv, bn, pool = self.module
        return pool(torch.relu(bn(conv(x))))

    def sizes(self, n: np.ndarray) -> list[np.ndarray]:
        """Map sizes before and after every step."""
        out = [n]
        for op, _ in self.steps:
            out.append(op.out_size(out[-1]))
        return out

    def changed(self, lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output box that inputs changed in [lo, hi) can change (the branch's and the shortcut's union)."""
        sizes = self.sizes(n)
        out_lo, out_hi = lo, hi
        for (op, _), n_out in zip(self.steps, sizes[1:]):
            out_lo, out_hi = op.changed(out_lo, out_hi, n_out)
        if self.residual:
            s_lo, s_hi = self.shortcut_op.changed(lo, hi, sizes[-1])
            out_lo, out_hi = np.minimum(out_lo, s_lo), np.maximum(out_hi, s_hi)
        return out_lo, out_hi

    def _branch_boxes(self, lo: np.ndarray, extent: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        boxes = [(lo, extent)]
        for op, _ in reversed(self.steps):
            boxes.insert(0, op.needed(*boxes[0]))
        return boxes

    def crop_box(self, lo: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input box both the branch and the shortcut read for outputs [lo, lo + extent)."""
        b_lo, b_ext = self._branch_boxes(lo, extent)[0]
        if not self.residual:
            return b_lo, b_ext
        s_lo, s_ext = self.shortcut_op.needed(lo, extent)
        c_lo = np.minimum(b_lo, s_lo)
        return c_lo, np.maximum(b_lo + b_ext, s_lo + s_ext).max(axis=0) - c_lo[0]

    def run(self, crop: torch.Tensor, crop_lo: np.ndarray, lo: np.ndarray, extent: np.ndarray,
            n: np.ndarray) -> torch.Tensor:
        """Outputs [lo, lo + extent) (per row) from ``crop``: the input box at ``crop_lo``, zero outside the map."""
        boxes, sizes = self._branch_boxes(lo, extent), self.sizes(n)
        x = _sub(crop, boxes[0][0] - crop_lo, boxes[0][1])
        for i, (op, fn) in enumerate(self.steps):
            x = fn(x)
            if self.relu_after[i]:
                x = torch.relu(x)
            if i < len(self.steps) - 1:
                x = _zero_outside(x, boxes[i + 1][0], sizes[i + 1])
        if self.residual:
            s_lo, s_ext = self.shortcut_op.needed(lo, extent)
            sub = _sub(crop, s_lo - crop_lo, s_ext)
            identity = sub if self.shortcut is None else self.shortcut[1](sub)
            x = torch.relu(x + identity)
        return x


def _sub(x: torch.Tensor, offset: np.ndarray, extent: np.ndarray) -> torch.Tensor:
    """x[..., offset:offset + extent] for an offset that is the same for every row."""
    if (offset != offset[0]).any():
        raise AssertionError("rows of a batch must share their offsets")
    (r, c), (h, w) = offset[0], extent
    return x[..., r:r + h, c:c + w]


def _zero_outside(x: torch.Tensor, lo: np.ndarray, n: np.ndarray) -> torch.Tensor:
    """Zero every row's positions outside [0, n) of its box at corner lo[b]: the next conv's zero padding."""
    h, w = x.shape[2:]
    if (lo >= 0).all() and (lo + (h, w) <= n).all():
        return x
    lo_t = torch.from_numpy(lo).to(x.device)
    rows = torch.arange(h, device=x.device)[None] + lo_t[:, :1]
    cols = torch.arange(w, device=x.device)[None] + lo_t[:, 1:]
    keep = ((rows >= 0) & (rows < int(n[0])))[:, :, None] & ((cols >= 0) & (cols < int(n[1])))[:, None, :]
    return x * keep[:, None].to(x.dtype)


def _crop(src: torch.Tensor, lo: np.ndarray, extent: np.ndarray) -> torch.Tensor:
    """(1, C, H, W) map -> (B, C, *extent) boxes at the corners lo, zero outside the map."""
    n = np.array(src.shape[2:])
    out = src.new_zeros((len(lo), src.shape[1], *(int(e) for e in extent)))
    a, z = np.maximum(lo, 0), np.minimum(lo + extent, n)
    for b in range(len(lo)):
        if (z[b] > a[b]).all():
            d = a[b] - lo[b]
            out[b, :, d[0]:d[0] + z[b][0] - a[b][0], d[1]:d[1] + z[b][1] - a[b][1]] = \
                src[0, :, a[b][0]:z[b][0], a[b][1]:z[b][1]]
    return out


def _paste(dst: torch.Tensor, dst_lo: np.ndarray, src: torch.Tensor, src_lo: np.ndarray) -> None:
    """Copy each row's box src (corner src_lo) into its box dst (corner dst_lo), where they overlap."""
    a = np.maximum(dst_lo, src_lo)
    z = np.minimum(dst_lo + dst.shape[2:], src_lo + src.shape[2:])
    for b in range(len(a)):
        if (z[b] > a[b]).all():
            d, s = a[b] - dst_lo[b], a[b] - src_lo[b]
            e = z[b] - a[b]
            dst[b, :, d[0]:d[0] + e[0], d[1]:d[1] + e[1]] = src[b, :, s[0]:s[0] + e[0], s[1]:s[1] + e[1]]


def _fit(lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Common extent covering every row's [lo, hi), corners shifted inside [0, n) (occlusion3d's rule)."""
    extent = np.maximum((hi - lo).max(axis=0), 1)
    return np.clip(np.minimum(lo, n - extent), 0, None), extent


# --- the network ---------------------------------------------------------------------------------

class IncrementalResNet:
    """A torchvision-style ResNet trunk (conv1/bn1/maxpool, layer1..4) as stages for incremental inference."""

    def __init__(self, model: nn.Module) -> None:
        if model.training:
            raise ValueError("incremental occlusion needs the model in eval mode (BatchNorm must be per-channel affine)")
        self.stages = [Stage((model.conv1, model.bn1, model.maxpool))] + [
            Stage(block) for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]

    def cache(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's input, then the trunk's output (``layer4``) for the unoccluded input."""
        acts = [x]
        for stage in self.stages:
            acts.append(stage.full(acts[-1]))
        return acts

    def changed_boxes(self, lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stage output, the box each window can change (windows' own boxes first)."""
        boxes = [(lo, hi)]
        for stage in self.stages:
            boxes.append(stage.changed(*boxes[-1], n))
            n = stage.sizes(n)[-1]
        return boxes

    def occluded_features(self, acts: list[torch.Tensor], boxes: list[tuple[np.ndarray, np.ndarray]],
                          fill: torch.Tensor) -> torch.Tensor:
        """``layer4`` maps (B, units, h, w) with each row's window set to ``fill`` (C,) at the input."""
        w_lo, w_hi = boxes[0]
        tile, tile_lo = None, w_lo
        for i, stage in enumerate(self.stages):
            n_in, n_out = np.array(acts[i].shape[2:]), np.array(acts[i + 1].shape[2:])
            lo, extent = _fit(*boxes[i + 1], n_out)
            crop_lo, crop_ext = stage.crop_box(lo, extent)
            crop = _crop(acts[i], crop_lo, crop_ext)
            if tile is None:  # the occluded input: each window's pixels set to the fill value
                for b in range(len(w_lo)):
                    (r0, c0), (r1, c1) = w_lo[b] - crop_lo[b], w_hi[b] - crop_lo[b]
                    crop[b, :, r0:r1, c0:c1] = fill[:, None, None].to(crop.device)
            else:
                _paste(crop, crop_lo, tile, tile_lo)
            tile, tile_lo = stage.run(crop, crop_lo, lo, extent, n_in), lo
        features = acts[-1].expand(len(w_lo), -1, -1, -1).clone()
        _paste(features, np.zeros_like(tile_lo), tile, tile_lo)
        return features


@torch.inference_mode()
def incremental_drops(model: nn.Module, head: Head, normalised: torch.Tensor, target: int, lo: np.ndarray,
                      hi: np.ndarray, fill: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """score(unoccluded) - score(occluded) per window [lo, hi), recomputing only the boxes each can change."""
    net = IncrementalResNet(model)
    acts = net.cache(normalised)
    base = float(head(acts[-1])[0, target])
    boxes = net.changed_boxes(lo, hi, np.array(normalised.shape[2:]))
    drops = np.zeros(len(lo), dtype=np.float32)
    for start in range(0, len(lo), batch_size):
        rows = slice(start, start + batch_size)
        features = net.occluded_features(acts, [(a[rows], z[rows]) for a, z in boxes], fill)
        drops[rows] = base - head(features)[:, target].float().cpu().numpy()
    return drops


def occlusion_map(model: nn.Module, head: Head, normalise: Normalise, grey: torch.Tensor, target: int, size: int,
                  stride: int, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """grey: (1, 1, H, W) input -> (H, W) relevance, Captum's occlusion semantics (baseline 0)."""
    shape = tuple(grey.shape[2:])
    lo, hi = window_boxes(shape, size, stride)
    fill = normalise(torch.zeros(1, 1, 1))[0, :, 0, 0]
    drops = incremental_drops(model, head, normalise(grey[:, 0]), target, lo, hi, fill, batch_size)
    return relevance_map(shape, lo, hi, drops)


def occlusion_map_reference(score_model: nn.Module, grey: torch.Tensor, target: int, size: int, stride: int,
                            batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """Captum's Occlusion, one full forward per window: what ``occlusion_map`` must reproduce."""
    attr = Occlusion(score_model).attribute(grey, sliding_window_shapes=(1, size, size), strides=(1, stride, stride),
                                           baselines=0, target=target, perturbations_per_eval=batch_size)
    return attr.detach()[0, 0].float().numpy()
