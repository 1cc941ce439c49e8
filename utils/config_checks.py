"""Checks that read several keys at once (utils/config.py runs them after every key passed its own check)."""
from __future__ import annotations

import math

from utils.config_schema import DEFAULTS, Config


def _cross_checks(cfg: Config, raw: dict) -> list[str]:
    errs = []
    if cfg.scheduler != "multistep" and (raw.get("milestones") or raw.get("init_milestones")):
        errs.append("config keys 'milestones'/'init_milestones' only apply to \"scheduler\": \"multistep\"")
    if cfg.scheduler != "cosine" and "min_lr" in raw and cfg.min_lr:
        errs.append("config key 'min_lr' only applies to \"scheduler\": \"cosine\"")
    d = DEFAULTS
    if cfg.optimizer != "sgd" and raw.get("momentum", d.momentum) != d.momentum:
        errs.append("config key 'momentum' only applies to \"optimizer\": \"sgd\"")
    if cfg.pretrained_path and not cfg.pretrained:
        errs.append("config key 'pretrained_path' is set but 'pretrained' is false; set pretrained to true")
    if cfg.model_name == "lora_task_id" and not cfg.mask_old_logits:
        errs.append("model_name 'lora_task_id' trains each task's head among its own classes: set "
                    "mask_old_logits to true")
    drift = cfg.drift_threshold is not None
    if cfg.model_name in ("sdlora", "sdlora_rr") and cfg.skip_mode != "none" and cfg.growth_schedule is None \
            and not drift:
        errs.append("config key 'skip_mode' applies to the tasks a 'growth_schedule' leaves without an adapter; "
                    "set growth_schedule (or drift_threshold) or remove skip_mode")
    if drift and (cfg.skip_mode != "reuse" or cfg.growth_schedule is not None):
        errs.append("config key 'drift_threshold' decides growth by a reuse trial: it needs \"skip_mode\": \"reuse\" "
                    "and no 'growth_schedule'")
    if drift and cfg.trial_epochs >= cfg.epochs:
        errs.append(f"config key 'trial_epochs' = {cfg.trial_epochs} must be below 'epochs' = {cfg.epochs}: the "
                    "trial is the first part of a task")
    for key in ("trial_epochs", "probe_images"):
        if not drift and raw.get(key, getattr(DEFAULTS, key)) != getattr(DEFAULTS, key):
            errs.append(f"config key '{key}' only applies with 'drift_threshold' set; remove it or set drift_threshold")
    errs += _subspace_checks(cfg, raw)
    if cfg.model_name == "gumbel_sdlora":
        if cfg.gumbel_tau_final > cfg.gumbel_tau_init:
            errs.append("config key 'gumbel_tau_final' must be <= 'gumbel_tau_init'")
        if raw.get("prune_samples", d.prune_samples) != d.prune_samples and cfg.prune_rule != "frequency":
            errs.append("config key 'prune_samples' only applies to \"prune_rule\": \"frequency\"")
        if raw.get("prune_threshold", d.prune_threshold) != d.prune_threshold and cfg.prune_rule != "frequency":
            errs.append("config key 'prune_threshold' only applies to \"prune_rule\": \"frequency\"")
        e_w = math.ceil(cfg.warmup_fraction * cfg.epochs)
        e_1 = math.ceil(cfg.phase1_fraction * cfg.epochs)
        # task 0 is single-phase; a kept new adapter must train somewhere: in a warm-up or in phase 2
        if cfg.two_phase and (e_w + e_1 > cfg.epochs or (e_w == 0 and e_1 >= cfg.epochs)):
            errs.append(f"config key 'epochs' = {cfg.epochs} with warmup_fraction {cfg.warmup_fraction} and "
                        f"phase1_fraction {cfg.phase1_fraction} leaves phase 2 no epoch ({e_w} warm-up + {e_1} "
                        "phase 1), so new adapters never train; raise 'epochs' or lower the fractions")
        if cfg.gumbel_tau_schedule == "phase" and \
                raw.get("gumbel_anneal_rate", d.gumbel_anneal_rate) != d.gumbel_anneal_rate:
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
                if raw.get(key, getattr(d, key)) != getattr(d, key):
                    errs.append(f"config key '{key}' only applies with \"two_phase\": true; remove it or "
                                "set two_phase to true")
        if cfg.prune_scope == "new" and cfg.gate_scope == "previous":
            errs.append('"prune_scope": "new" with "gate_scope": "previous" can never prune (the new adapter '
                        'is not gated); use "prune_scope": "all" or "gate_scope": "all"')
        if raw.get("growth_threshold", d.growth_threshold) != d.growth_threshold and cfg.prune_rule != "threshold":
            errs.append("config key 'growth_threshold' only applies to \"prune_rule\": \"threshold\"")
    return errs


def _subspace_checks(cfg: Config, raw: dict) -> list[str]:
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
