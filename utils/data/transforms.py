"""Train and test transforms (SPEC section 4), on uint8 CHW tensors, at any image size."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2


def build_transforms(img_size: int, crop_scale: Sequence[float], mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> tuple[v2.Compose, v2.Compose]:
    """SD-LoRA's pipeline: train RandomResizedCrop + flip; test Resize(size*256/224, bicubic) + CenterCrop.

    Mean/std normalisation only when ``mean`` and ``std`` are given.
    """
    tail = [v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        tail.append(v2.Normalize(mean=list(mean), std=list(std)))
    train = v2.Compose([
        v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), antialias=True),
        v2.RandomHorizontalFlip(),
        *tail,
    ])
    test = v2.Compose([
        v2.Resize(int(round(img_size * 256 / 224)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        *tail,
    ])
    return train, test
