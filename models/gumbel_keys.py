"""Gumbel CL-LoRA's own config keys and the checks that read several of them (SPEC section 3).

Declared here, not in the shared schema: ``models/gumbel_sdlora.py`` registers them with the method, so
``--keys`` lists them under ``[gumbel_sdlora]`` and another method refuses them set away from their default.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from utils.config.schema import DEFAULTS, _fraction, _key, _non_negative, _positive


def _warmup(v) -> Optional[str]:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _holdout(v) -> Optional[str]:
    return None if 0 <= v <= 0.5 else "must be in [0, 0.5]"


@dataclasses.dataclass
class GumbelKeys:
    """The gate, its temperature, the two phases and the growth decision."""
    gumbel_tau_init: float = _key(5.0, "initial temperature", check=_positive)
    gumbel_tau_final: float = _key(0.5, "final temperature", check=_positive)
    gumbel_tau_schedule: Literal["step", "phase"] = _key(
        "step", "step: tau_final + (tau_init - tau_final) * rate**s over optimiser steps s (the notes'); "
        "phase: geometric from tau_init to tau_final over the phase, whatever its number of steps")
    gumbel_anneal_rate: float = _key(0.999, "step schedule: tau decays by this factor per optimiser step",
                                     check=_fraction)
    lambda_sparsity: float = _key(0.1, "weight of the entropy sparsity term", check=_non_negative)
    sparsity_eps: float = _key(1e-8, "eps inside log(beta + eps)", check=_positive)
    gate_scope: Literal["all", "previous", "new"] = _key(
        "all", "all: gate every active adapter; previous: only old ones; new: only the new adapter, against a "
        "skip option, old adapters anchored at the gate value their own task ended with")
    gate_granularity: Literal["task", "layer"] = _key("task", "one beta for all blocks, or one per block")
    two_phase: bool = _key(True, "phase 1 selection, then phase 2 magnitudes and new adapter")
    phase1_fraction: float = _key(0.6, "share of epochs in phase 1 (rounded up)", check=_fraction)
    warmup_fraction: float = _key(0.0, "share of epochs (rounded up) that train the new adapter ungated (g = 1) "
                                  "with alphas and head, before phase 1 judges it", check=_warmup)
    growth_cost: float = _key(0.0, "phase 1 price of the new adapter: loss += growth_cost * its gate value "
                              "(nats per unit of gate)", check=_non_negative)
    selection_holdout: float = _key(0.0, "share of each new class's training images kept out of the warm-up "
                                    "and used alone, head frozen, by phase 1 to judge the new adapter "
                                    "(0: phase 1 trains on the task's whole data)", check=_holdout)
    retrain: Literal["none", "skip", "all"] = _key(
        "none", "after the growth decision, restart the task (head, magnitudes, new adapter as it found them) and "
        "train the chosen structure for all epochs: never, when the new adapter was pruned, or always")
    cost_by_share: bool = _key(False, "with skip_mode reuse: divide growth_cost by the number of tasks the "
                               "adapter a skip would reopen already serves")
    gate_lr: Optional[float] = _key(None, "learning rate of the gate logits (default: lrate)", check=_positive)
    alpha_lr: float = _key(0.04, "phase 2 learning rate of alpha", check=_positive)
    lambda_alpha: float = _key(1e-4, "phase 2 weight of sum(alpha^2)", check=_non_negative)
    prune_rule: Literal["threshold", "frequency"] = _key("threshold", "how the growth decision is made")
    growth_threshold: float = _key(1e-6, "threshold rule: prune if beta <= this", check=_non_negative)
    prune_samples: int = _key(10, "frequency rule: Gumbel samples", check=_positive)
    prune_threshold: float = _key(0.2, "frequency rule: prune if selection frequency < this", check=_non_negative)
    prune_scope: Literal["all", "new"] = _key("all", "which adapters may be pruned")


G = GumbelKeys()  # the defaults, to tell a key set away from them


def _set(raw: dict, key: str) -> bool:
    """Whether the config sets ``key`` away from its default."""
    default = getattr(G, key) if hasattr(G, key) else getattr(DEFAULTS, key)
    return raw.get(key, default) != default


def check_gumbel(cfg, raw: dict) -> list[str]:
    """Combinations of keys that cannot run or would silently do nothing."""
    errs = []
    if cfg.gumbel_tau_final > cfg.gumbel_tau_init:
        errs.append("config key 'gumbel_tau_final' must be <= 'gumbel_tau_init'")
    for key in ("prune_samples", "prune_threshold"):
        if _set(raw, key) and cfg.prune_rule != "frequency":
            errs.append(f"config key '{key}' only applies to \"prune_rule\": \"frequency\"")
    e_w = math.ceil(cfg.warmup_fraction * cfg.epochs)
    e_1 = math.ceil(cfg.phase1_fraction * cfg.epochs)
    # task 0 is single-phase; a kept new adapter must train somewhere: in a warm-up or in phase 2
    if cfg.two_phase and (e_w + e_1 > cfg.epochs or (e_w == 0 and e_1 >= cfg.epochs)):
        errs.append(f"config key 'epochs' = {cfg.epochs} with warmup_fraction {cfg.warmup_fraction} and "
                    f"phase1_fraction {cfg.phase1_fraction} leaves phase 2 no epoch ({e_w} warm-up + {e_1} "
                    "phase 1), so new adapters never train; raise 'epochs' or lower the fractions")
    if cfg.gumbel_tau_schedule == "phase" and _set(raw, "gumbel_anneal_rate"):
        errs.append("config key 'gumbel_anneal_rate' only applies to \"gumbel_tau_schedule\": \"step\"")
    if cfg.growth_cost and cfg.gate_scope == "previous":
        errs.append('config key \'growth_cost\' prices the new adapter\'s gate value, but "gate_scope": '
                    '"previous" does not gate it; use "gate_scope": "all" or "new"')
    if cfg.skip_mode == "reuse" and cfg.two_phase and cfg.retrain == "none" and e_w + e_1 >= cfg.epochs:
        errs.append('"skip_mode": "reuse" trains the reopened adapter in phase 2, but the warm-up and '
                    "phase 1 leave phase 2 no epoch; lower warmup_fraction or phase1_fraction, or set retrain")
    if cfg.cost_by_share and (cfg.skip_mode != "reuse" or not cfg.growth_cost):
        errs.append('config key \'cost_by_share\' divides growth_cost by how many tasks share the adapter a '
                    'skip reopens: it needs "skip_mode": "reuse" and a growth_cost > 0')
    if cfg.selection_holdout and cfg.warmup_fraction == 0:
        errs.append("config key 'selection_holdout' keeps images out of the warm-up, but 'warmup_fraction' "
                    "is 0 (no warm-up, phase 1 judges an untrained adapter); set a warmup_fraction or "
                    "remove selection_holdout")
    if cfg.gate_scope == "new" and cfg.gate_granularity == "layer":
        errs.append('"gate_scope": "new" anchors one gate value per adapter: use "gate_granularity": "task"')
    if not cfg.two_phase:
        for key in ("phase1_fraction", "alpha_lr", "lambda_alpha", "warmup_fraction", "selection_holdout",
                    "skip_mode", "retrain"):
            if _set(raw, key):
                errs.append(f"config key '{key}' only applies with \"two_phase\": true; remove it or "
                            "set two_phase to true")
    if cfg.prune_scope == "new" and cfg.gate_scope == "previous":
        errs.append('"prune_scope": "new" with "gate_scope": "previous" can never prune (the new adapter '
                    'is not gated); use "prune_scope": "all" or "gate_scope": "all"')
    if _set(raw, "growth_threshold") and cfg.prune_rule != "threshold":
        errs.append("config key 'growth_threshold' only applies to \"prune_rule\": \"threshold\"")
    return errs
