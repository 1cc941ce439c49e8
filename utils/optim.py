"""Optimisers and learning-rate schedules named by the config (every one honoured, none ignored)."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def build_optimizer(name: str, groups: Iterable[dict], lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over parameter groups; a group may carry its own lr."""
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'")


def build_scheduler(name: str, opt: torch.optim.Optimizer, epochs: int, milestones: Optional[list[int]],
                    decay: float, min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: constant, cosine (to min_lr over the phase's epochs), multistep, or coda_cosine
    (CODA-Prompt's and InfLoRA's: lr = base cos(99 pi e / (200 (K - 1))) at epoch e of K, 1.6 % of base at
    the last epoch)."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=min_lr)
    if name == "coda_cosine":
        k = max(epochs, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 1.0 if k == 1 else math.cos(99 * math.pi * e / (200 * (k - 1))))
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones or []), gamma=decay)
    raise ValueError(f"unknown scheduler '{name}'")
