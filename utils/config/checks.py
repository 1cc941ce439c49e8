"""Checks that read several keys at once (reading.py runs them after every key passed its own check)."""
from __future__ import annotations

from utils.config.schema import DEFAULTS, Config


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
    return errs
