"""SubLoRA's settings for a method whose adapters may train in a random subspace (``intrinsic_dim``): the
subspace spec of each task, the check that the budget fits the backbone, the optimiser group of z with its own
learning rate, and the learned split recorded per task. The parametrisation itself is backbone/subspace.py."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from backbone.subspace import SubspaceSpec
from backbone.vit import LoRAViT
from utils.config import DEFAULTS, Config, ConfigError

log = logging.getLogger("cl")


def check_keys(cfg: Config, raw: dict) -> list[str]:
    """SubLoRA keys: the allocation keys need intrinsic_dim, and a subspace adapter is never reopened."""
    d, errs = DEFAULTS, []
    if cfg.intrinsic_dim is None:
        for key in ("allocation_mode", "allocation_ratio", "subspace_lr", "split_lr", "subspace_norm"):
            if raw.get(key, getattr(d, key)) != getattr(d, key):
                errs.append(f"config key '{key}' shapes the SubLoRA subspace: set 'intrinsic_dim' or remove it")
        return errs
    if cfg.split_lr is not None and cfg.allocation_mode != "learned":
        errs.append('config key \'split_lr\' only applies to "allocation_mode": "learned"')
    if raw.get("allocation_ratio", d.allocation_ratio) != d.allocation_ratio and cfg.allocation_mode != "fixed":
        errs.append('config key \'allocation_ratio\' only applies to "allocation_mode": "fixed"')
    d_b = int(round(cfg.allocation_ratio * cfg.intrinsic_dim))
    if cfg.allocation_mode == "fixed" and not 1 <= d_b <= cfg.intrinsic_dim - 1:
        errs.append(f"allocation_ratio {cfg.allocation_ratio} of intrinsic_dim {cfg.intrinsic_dim} leaves A or B "
                    "no coordinate; pick a ratio nearer 0.5 or a larger intrinsic_dim")
    if cfg.skip_mode == "reuse":
        errs.append('config key \'intrinsic_dim\' with "skip_mode": "reuse": a reopened adapter has no '
                    "subspace of its own; use skip_mode none or plain LoRA")
    return errs


def check_budget(cfg: Config, backbone: LoRAViT, rank: Callable[[int], int]) -> None:
    """An intrinsic_dim the backbone cannot take is refused before any task trains."""
    if cfg.intrinsic_dim is None:
        return
    n_blocks = len(backbone.layers)
    smallest = 2 * n_blocks * len(cfg.lora_targets) * backbone.num_features * min(rank(t) for t in range(64))
    if cfg.intrinsic_dim > smallest:
        raise ConfigError(f"config key 'intrinsic_dim' = {cfg.intrinsic_dim} exceeds the {smallest:,} LoRA parameters "
                          "of a task's adapter; lower it, or set it to null for plain LoRA")
    if cfg.allocation_mode == "learned" and cfg.intrinsic_dim < n_blocks:
        raise ConfigError(f"config key 'intrinsic_dim' = {cfg.intrinsic_dim}: \"allocation_mode\": \"learned\" splits "
                          f"it over the {n_blocks} blocks; it must be >= {n_blocks}")


def spec(cfg: Config, seed: int) -> Optional[SubspaceSpec]:
    """The subspace of a task's adapter (``seed``: the task's own); None: plain LoRA factors."""
    if cfg.intrinsic_dim is None:
        return None
    return SubspaceSpec(cfg.intrinsic_dim, cfg.allocation_mode, cfg.allocation_ratio, seed=1_000_003 + seed,
                        norm=cfg.subspace_norm)


def param_groups(cfg: Config, backbone: LoRAViT, params: list) -> list[dict]:
    """The trainable tensors, with the subspace's z and split logits in a group of their own when
    ``subspace_lr`` is set, and the split logits alone in one when ``split_lr`` is."""
    sub = backbone.subspace
    if sub is None or (cfg.subspace_lr is None and cfg.split_lr is None):
        return [{"params": params}]
    split = {id(sub.split)} if cfg.split_lr is not None and sub.split is not None else set()
    own = {id(p) for p in sub.parameters()} - split if cfg.subspace_lr is not None else set()
    groups = [{"params": [p for p in params if id(p) not in own | split]}]
    if own:
        groups.append({"params": [p for p in params if id(p) in own], "lr": cfg.subspace_lr})
    if split:
        groups.append({"params": [sub.split], "lr": cfg.split_lr})
    return groups


def record_split(metrics: dict, backbone: LoRAViT, task: int) -> None:
    """The learned allocation of task ``task``: gamma_l, the share of block l's z that feeds B."""
    split = backbone.subspace_split(task)
    if split is not None:
        metrics.setdefault("subspace_gamma", []).append([round(float(g), 4) for g in torch.sigmoid(split)])
        log.info(f"Subspace split of task {task}, gamma per block (share of z on B): {metrics['subspace_gamma'][-1]}")
