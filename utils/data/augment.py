"""Batched augmentation on the device (``augment_on: "device"``): the train and test transforms of
utils/transforms.py applied to a whole uint8 batch at once.

Train: per image a RandomResizedCrop box, drawn as torchvision draws it (10 tries of a target area in
``scale`` and a log-uniform aspect ratio in [3/4, 4/3], else the central crop), and a flip with p = 0.5;
then one resampling op for the batch: out = Wy @ x @ Wx^T, with per-image interpolation matrices built
from the boxes with the weights of torch's antialiased bilinear resize (``resize(crop(x))`` to within one
uint8 level; a crop box is a span of the matrices, a flip reverses Wx's rows). Test: Resize(round(S * 256
/ 224), bicubic, antialias) and CenterCrop(S) in the same form.
Both round to uint8 before scaling to [0, 1], as torchvision does on uint8 tensors.

The random numbers come from the global torch stream, or with ``seed_per_sample`` from a counter-based
hash of each image's own seed (``sample_seed``), so that the images do not depend on the process or the
batch an image falls in.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

TRIES = 10
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
DRAWS = 4 * TRIES + 1  # per try: area, ratio, top, left; then the flip


# ---- random numbers ---------------------------------------------------------------------------------
def hashed_uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """(len(seeds), n) uniforms in [0, 1): splitmix64 of seed + k * golden gamma, k = 1..n. Vectorised and
    counter-based: draw k of an image depends on its seed alone."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64)[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None] * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# ---- crop boxes ---------------------------------------------------------------------------------------
def crop_boxes(u: torch.Tensor, height, width, scale: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes from uniforms ``u`` (N, DRAWS) for images of ``height`` x ``width`` (ints, or
    (N,) tensors: one size per image): (top, left, h, w) as an (N, 4) long tensor, and the flip flags (N,).
    The first try whose box fits wins; none: the central crop of torchvision's fallback."""
    u = u.double()
    n = u.shape[0]
    H = torch.as_tensor(height, dtype=torch.float64).expand(n)[:, None]
    W = torch.as_tensor(width, dtype=torch.float64).expand(n)[:, None]
    tries = u[:, :4 * TRIES].view(n, TRIES, 4)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * tries[..., 1])
    w = torch.round(torch.sqrt(area * ratio))   # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / ratio))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    top = torch.floor(tries[..., 2] * (H - h + 1).clamp_min(1))
    left = torch.floor(tries[..., 3] * (W - w + 1).clamp_min(1))
    pick = ok.double().argmax(1, keepdim=True)
    boxes = torch.cat([top.gather(1, pick), left.gather(1, pick), h.gather(1, pick), w.gather(1, pick)], 1)
    boxes = torch.where(ok.any(1, keepdim=True), boxes, _fallback(H[:, 0], W[:, 0]))
    return boxes.long(), u[:, 4 * TRIES] < 0.5


def _fallback(H: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """torchvision's central crop when no try fits: the whole image, its ratio clipped to [3/4, 4/3]."""
    lo, hi = math.exp(LOG_RATIO[0]), math.exp(LOG_RATIO[1])
    in_ratio = W / H
    h = torch.where(in_ratio < lo, torch.round(W / lo), H)
    w = torch.where(in_ratio > hi, torch.round(H * hi), W)
    return torch.stack([torch.floor((H - h) / 2), torch.floor((W - w) / 2), h, w], 1)


# ---- resampling weights -------------------------------------------------------------------------------
def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp_min(0)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(in_size: torch.Tensor, in_offset: torch.Tensor, n_out: int, full: int,
                   out_total: Optional[torch.Tensor] = None, out_offset: Optional[torch.Tensor] = None,
                   kernel: str = "bilinear") -> torch.Tensor:
    """(N, n_out, full) matrices: per image, the span [in_offset, in_offset + in_size) of an axis of length
    ``full`` resized to ``out_total`` samples (default n_out), of which rows out_offset .. out_offset + n_out
    are kept (a center crop after the resize). Torch's antialiased weights (align_corners=False): for
    output o, center c = s (o + 0.5), s = in/out, support = k/2 max(s, 1), taps j in [int(c - support + 0.5),
    int(c + support + 0.5)) of the span, weight filter((j - c + 0.5) / max(s, 1)), normalised."""
    fn, half = (_bilinear, 1.0) if kernel == "bilinear" else (_bicubic, 2.0)
    dev = in_size.device
    size = in_size.double()[:, None, None]                              # (N, 1, 1)
    total = size.new_full(size.shape, float(n_out)) if out_total is None else out_total.double()[:, None, None]
    first = 0.0 if out_offset is None else out_offset.double()[:, None, None]
    s = size / total
    stretch = s.clamp_min(1.0)
    support = half * stretch
    c = s * (first + torch.arange(n_out, dtype=torch.float64, device=dev)[None, :, None] + 0.5)  # (N, out, 1)
    j = torch.arange(full, dtype=torch.float64, device=dev)[None, None, :] - in_offset.double()[:, None, None]
    lo = torch.trunc(c - support + 0.5).clamp_min(0)
    hi = torch.minimum(torch.trunc(c + support + 0.5), size)
    w = fn((j - c + 0.5) / stretch) * ((j >= lo) & (j < hi))
    norm = w.sum(-1, keepdim=True)
    return (w / torch.where(norm != 0, norm, torch.ones_like(norm))).float()


def resample(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, Sy, Sx) in [0, 1]: Wy x Wx^T for the whole batch, in torch's
    order for uint8 images (the width pass, rounded and clamped to uint8 levels, then the height pass):
    within one level of torchvision's uint8 resize, which uses fixed-point weights."""
    t = torch.matmul(x.float(), wx.transpose(1, 2)[:, None]).round_().clamp_(0, 255)
    return torch.matmul(wy[:, None], t).round_().clamp_(0, 255).div_(255)


class DeviceAugment:
    """The train or test transform of a run for uint8 batches already on the device."""

    def __init__(self, img_size: int, crop_scale: Sequence[float], mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        self.size, self.scale = img_size, tuple(crop_scale)
        self.mean = None if mean is None or std is None else torch.tensor(mean).view(1, 3, 1, 1)
        self.std = None if mean is None or std is None else torch.tensor(std).view(1, 3, 1, 1)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def uniforms(self, n: int, seeds: Optional[np.ndarray]) -> torch.Tensor:
        """(n, DRAWS) uniforms: from each image's seed, or from the global torch stream."""
        if seeds is not None:
            return torch.from_numpy(hashed_uniforms(seeds, DRAWS))
        return torch.rand(n, DRAWS, dtype=torch.float64)

    def train(self, x: torch.Tensor, seeds: Optional[np.ndarray] = None,
              sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RandomResizedCrop(size, scale) + flip of every image of the uint8 batch x (N, C, H, W); ``sizes``
        (N, 2): each image's own height and width when the batch is padded (file datasets)."""
        n, _, height, width = x.shape
        hs, ws = (height, width) if sizes is None else (sizes[:, 0].cpu(), sizes[:, 1].cpu())
        boxes, flip = crop_boxes(self.uniforms(n, seeds), hs, ws, self.scale)
        boxes, flip = boxes.to(x.device), flip.to(x.device)
        wy = resize_weights(boxes[:, 2], boxes[:, 0], self.size, height)
        wx = resize_weights(boxes[:, 3], boxes[:, 1], self.size, width)
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)  # a flip reverses the output columns
        return self._normalize(resample(x, wy, wx))

    def test(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Resize(round(size * 256 / 224), bicubic, antialias) + CenterCrop(size)."""
        n, _, height, width = x.shape
        if sizes is None:
            sizes = torch.tensor([[height, width]], device=x.device).expand(n, 2)
        H, W = sizes[:, 0].double(), sizes[:, 1].double()
        short = float(int(round(self.size * 256 / 224)))
        # torchvision's Resize(int): the shorter side to `short`, the longer int(short * long / shorter)
        rh = torch.where(W <= H, torch.floor(short * H / W), torch.full_like(H, short))
        rw = torch.where(W <= H, torch.full_like(W, short), torch.floor(short * W / H))
        top, left = torch.round((rh - self.size) / 2), torch.round((rw - self.size) / 2)
        zero = torch.zeros_like(H)
        wy = resize_weights(H, zero, self.size, height, rh, top, "bicubic")
        wx = resize_weights(W, zero, self.size, width, rw, left, "bicubic")
        return self._normalize(resample(x, wy, wx))
