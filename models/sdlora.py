"""SD-LoRA (Wu et al., ICLR 2025): decoupled magnitudes and directions, one adapter per task.

On task t, A_t, B_t, every alpha and the head train; old adapters are frozen and normalised
(SPEC section 4). SD-LoRA-RR shrinks the rank with the task index; SD-LoRA-KD drops a new adapter
whose direction the earlier ones already span, folding it into their magnitudes.
"""
from __future__ import annotations

import torch

from backbone.gate import FoldGate
from backbone.lora import adapter_norm, direction_inner
from models import register, sublora
from models.base import Learner, log, task_seed
from models.drift_growth import DriftGrowth
from models.need_growth import NeedGrowth
from models.novelty_growth import NoveltyGrowth
from models.reuse import latest_adapter_before, skip_adapter
from utils.config import DEFAULTS
from utils.io import save_torch


#: The growth rules, by the key that turns each on: a task gets its own adapter or reuses the latest one.
RULES = {"drift_threshold": DriftGrowth, "need_threshold": NeedGrowth, "novelty_threshold": NoveltyGrowth}


def _check(cfg, raw: dict) -> list[str]:
    """Growth keys (a fixed schedule, reuse, growth on drift or need) that cannot run together, and SubLoRA's."""
    drift, need = cfg.drift_threshold is not None, cfg.need_threshold is not None
    on = [key for key in RULES if getattr(cfg, key) is not None]
    errs = []
    if cfg.skip_mode != "none" and cfg.growth_schedule is None and not on:
        errs.append("config key 'skip_mode' applies to the tasks a 'growth_schedule' leaves without an adapter; "
                    "set growth_schedule (or drift_threshold, need_threshold, novelty_threshold) or remove skip_mode")
    for key in on:
        if cfg.skip_mode != "reuse" or cfg.growth_schedule is not None:
            errs.append(f"config key '{key}' decides between a new adapter and reusing the latest one: it needs "
                        "\"skip_mode\": \"reuse\" and no 'growth_schedule'")
    if len(on) > 1:
        errs.append(f"config keys {' and '.join(repr(k) for k in on)} are different growth rules; set one of them")
    if (drift or need) and cfg.trial_epochs >= cfg.epochs:
        errs.append(f"config key 'trial_epochs' = {cfg.trial_epochs} must be below 'epochs' = {cfg.epochs}: the "
                    "trial is the first part of a task")
    rules = {"trial_epochs": ("drift_threshold", "need_threshold"), "probe_images": ("drift_threshold",),
             "need_holdout": ("need_threshold",), "need_signal": ("need_threshold",),
             "max_share": ("novelty_threshold",), "novelty_reference": ("novelty_threshold",),
             "novelty_reopen": ("novelty_threshold",)}
    for key, names in rules.items():
        if all(getattr(cfg, n) is None for n in names) and \
                raw.get(key, getattr(DEFAULTS, key)) != getattr(DEFAULTS, key):
            errs.append(f"config key '{key}' only applies with " + " or ".join(f"'{n}'" for n in names)
                        + f" set; remove it or set {names[-1]}")
    if cfg.novelty_reopen == "nearest" and cfg.novelty_reference != "nearest":
        errs.append("config key 'novelty_reopen' = \"nearest\" reopens the adapter the novelty was least against; "
                    "it needs \"novelty_reference\": \"nearest\" (with \"latest\" that adapter is the latest)")
    return errs + sublora.check_keys(cfg, raw)


@register("sdlora", check=_check)
class SDLoRA(Learner):
    """The base learner already is SD-LoRA: gate g = 1, alpha per task, one training phase. With
    ``growth_schedule``, only the tasks listed get an adapter (a fixed-growth baseline); the others
    train the magnitudes and head, or, with ``skip_mode: "reuse"``, the latest adapter as well. With
    ``drift_threshold``, a task gets an adapter only when reusing the latest one drifts too far; with
    ``need_threshold``, only when a new one fits its held-out images better than reuse does; with
    ``novelty_threshold``, only when its images are unlike those the latest one was trained on."""

    default_alpha = 0.8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sublora.check_budget(self.cfg, self.net.backbone, self.rank)

    def adapter_spec(self, task: int):
        """SubLoRA (``intrinsic_dim``): the subspace of the task's adapter; None: plain LoRA factors."""
        return sublora.spec(self.cfg, task_seed(self.seed, task))

    def param_groups(self) -> list[dict]:
        return sublora.param_groups(self.cfg, self.net.backbone, super().param_groups()[0]["params"])

    def record_extra(self, task: int) -> None:
        sublora.record_split(self.metrics, self.net.backbone, task)

    def begin_task(self, task: int, n_new_classes: int) -> None:
        super().begin_task(task, n_new_classes)
        sched = self.cfg.growth_schedule
        if sched is not None and task not in sched:
            skip_adapter(self.net.backbone, task, reuse=self.cfg.skip_mode == "reuse")

    @property
    def rule(self):
        """The growth rule the config turns on (``RULES``), made once; None: every task its own adapter."""
        if not hasattr(self, "_rule"):
            self._rule = next((cls(self) for key, cls in RULES.items() if getattr(self.cfg, key) is not None), None)
        return self._rule

    def _restore(self, dm, done: int) -> None:
        """Growth on novelty compares with the statistics of earlier tasks: a fork of a run without the rule (its
        SD-LoRA parent) lacks them, so they are taken now, exactly as the task would have taken them (the task's
        images through the pretrained backbone, which no adapter changes)."""
        super()._restore(dm, done)
        if isinstance(self.rule, NoveltyGrowth):
            for t in range(done + 1):
                if not self.rule.path(t).is_file():
                    self.rule.observe(t, self.train_loader(dm, t))

    def train_task(self, task: int, loader) -> None:
        """One fit of the task's epochs; growth on drift, need or novelty (``RULES``) in its place."""
        rule = self.rule
        latest = latest_adapter_before(self.net.backbone, task)
        if rule is None or latest is None:  # no rule, or nothing to reuse yet (task 0)
            if isinstance(rule, NoveltyGrowth):
                rule.observe(task, loader)  # the statistics later tasks are compared with
            return super().train_task(task, loader)
        record = rule.train_task(task, loader, latest)
        self.metrics.setdefault("growth", []).append(
            {k: record[k] for k in ("task", "reopened", rule.signal, "nearest", "grow", "trained_adapter")
             if k in record})


@register("sdlora_rr", check=_check)
class SDLoRARR(SDLoRA):
    """SD-LoRA-RR: rank 10 for tasks 0-3, 8 for 4-7, 6 after (public default), or ``rank_schedule``."""

    default_schedule = [[0, 10], [4, 8], [8, 6]]

    def rank(self, task: int) -> int:
        sched = self.cfg.rank_schedule or self.default_schedule
        return [r for first, r in sched if first <= task][-1]


@register("sdlora_kd")
class SDLoRAKD(SDLoRA):
    """SD-LoRA-KD. After task t >= 1, with U_i = B_i A_i / n_i the normalised direction of adapter i in
    every block and slice, fit U_t ~ sum_i c_i U_i over the earlier active adapters by least squares,
    one c_i per adapter for all blocks and slices together (alpha is shared by them). If the relative
    residual ||U_t - sum_i c_i U_i|| / ||U_t|| is below ``kd_threshold``, adapter t is dropped and
    fold_i += m_t c_i, where m_t = alpha_t + fold_t is its magnitude: the network changes only by
    m_t times the residual. ``fold`` is never reset, so alpha_reset_each_task does not undo a fold."""

    def make_gate(self, n_layers: int) -> FoldGate:
        return FoldGate(n_layers)

    def end_task(self, task: int) -> None:
        super().end_task(task)
        old = [i for i in self.gate.active_tasks() if i != task]
        if task > 0 and old:
            self.fold_if_spanned(task, old)

    @torch.no_grad()
    def direction_gram(self, tasks: list[int]) -> torch.Tensor:
        """G_ij = sum over blocks and slices of <U_i, U_j>, from r x r products (no d x d matrix)."""
        n = len(tasks)
        gram = torch.zeros(n, n, dtype=torch.float64)
        kind = self.cfg.direction_norm
        for layer in self.net.backbone.layers:
            A = [layer.lora_A[str(t)].detach() for t in tasks]
            B = [layer.lora_B[str(t)].detach() for t in tasks]
            norm = [adapter_norm(a, b, kind) for a, b in zip(A, B)]
            inv = [torch.where(v > 0, 1.0 / v, torch.zeros_like(v)) for v in norm]  # B = 0: no direction
            for i in range(n):
                for j in range(i, n):
                    g = float((direction_inner(A[i], B[i], A[j], B[j]) * inv[i] * inv[j]).sum())
                    gram[i, j] += g
                    if i != j:
                        gram[j, i] += g
        return gram

    @torch.no_grad()
    def fold_if_spanned(self, task: int, old: list[int]) -> bool:
        """The rule above; returns whether adapter ``task`` was dropped. Writes kd_fit_task_{t}.pt."""
        gram = self.direction_gram(old + [task])
        g_oo, g_ot, g_tt = gram[:-1, :-1], gram[:-1, -1], gram[-1, -1]
        coef = torch.linalg.pinv(g_oo) @ g_ot
        res2 = g_tt - 2 * coef @ g_ot + coef @ g_oo @ coef
        rel = float(res2.clamp_min(0).sqrt() / g_tt.sqrt()) if g_tt > 0 else 0.0
        drop = rel < self.cfg.kd_threshold
        gate = self.gate
        if drop:
            m_t = float(gate.magnitude(task))
            for i, c in zip(old, coef.tolist()):
                gate.fold[i] += m_t * c
            gate.prune([task])
            self.net.backbone.configure()
        log.info(f"[KD] Task {task}: relative residual of its direction on {len(old)} earlier ones {rel:.4f} "
                 f"(threshold {self.cfg.kd_threshold}): " + ("dropped, folded into " + str(
                     {i: round(c, 4) for i, c in zip(old, coef.tolist())}) if drop else "kept"))
        save_torch(self.run_dir / f"kd_fit_task_{task}.pt", {
            "task": task, "earlier": torch.tensor(old), "coefficients": coef.float(), "relative_residual": rel,
            "dropped": drop, "fold": gate.fold.cpu().clone(), "pruning_mask": gate.pruning_mask.cpu().clone()})
        return drop
