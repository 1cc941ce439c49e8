"""Checks that read several keys at once (reading.py runs them after every key passed its own check)."""
from __future__ import annotations

from utils.config.schema import DEFAULTS, METHOD_HEADS, Config


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
    return errs + _head_checks(cfg, raw)


def _head_checks(cfg: Config, raw: dict) -> list[str]:
    """The statistics heads' keys apply only under the head that reads them (models/heads.py)."""
    errs, d, head = [], DEFAULTS, cfg.head_kind
    own = {"ranpac_dim": ("ridge",), "ranpac_ridge": ("ridge",),
           "drift_compensation": ("ncm", "feature_ridge", "aligned"), "align_samples": ("aligned",),
           "align_epochs": ("aligned",), "align_lr": ("aligned",), "align_temperature": ("aligned",)}
    for key, heads in own.items():
        # a first-session ridge head reads ranpac_dim and ranpac_ridge too
        used = {head, cfg.first_session_head} if key in ("ranpac_dim", "ranpac_ridge") else {head}
        if not used & set(heads) and raw.get(key, getattr(d, key)) != getattr(d, key):
            errs.append(f"config key '{key}' only applies with \"head\": " + " or ".join(f'"{h}"' for h in heads)
                        + f" (the head here is \"{head}\"); remove it or set head")
    if cfg.drift_compensation != "sdc" and raw.get("sdc_sigma", d.sdc_sigma) != d.sdc_sigma:
        errs.append("config key 'sdc_sigma' only applies with \"drift_compensation\": \"sdc\"; remove it or set that")
    if cfg.model_name == "lora_task_id" and head != "linear":
        errs.append("model_name 'lora_task_id' classifies each image among its own task's classes with its own head "
                    "rows; remove 'head' (or set it to \"linear\")")
    if cfg.first_session_head is not None and head not in ("ridge", "feature_ridge"):
        errs.append(f"config key 'first_session_head' adds its logits to a ridge head's; set \"head\" to \"ridge\" or "
                    f"\"feature_ridge\" (it is \"{head}\"), or remove first_session_head")
    if cfg.first_session_head is not None and cfg.model_name == "inflora":
        errs.append("config key 'first_session_head' reads the backbone as task 0 left it, but inflora folds every "
                    "task's adapter into the frozen weights; remove first_session_head")
    if cfg.model_name in METHOD_HEADS and head == "linear":
        errs.append(f"model_name '{cfg.model_name}' trains no classifier; set \"head\" to \"ncm\", \"ridge\" or "
                    "\"aligned\", or null for its own")
    return errs
