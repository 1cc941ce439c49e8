"""Per-task magnitudes and gates: the coefficients w_i = g_i * alpha_i that weight each adapter.

``AdapterGate`` (SD-LoRA) holds one learnable alpha per task and a pruning mask; its gate is g = 1.
``GumbelGate`` (Gumbel CL-LoRA, SPEC section 3) adds logits and g = beta = sparsemax((l + G) / tau)
over the active adapters, one sample per step shared by all blocks (or one row per block).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from utils.gumbel_utils import gumbel_sparsemax


class AdapterGate(nn.Module):
    """alpha per task (one scalar shared by every block and slice) and the pruning mask."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers
        self.alpha = nn.ParameterDict()
        self.register_buffer("pruning_mask", torch.ones(0))
        self._active: list[bool] = []  # host mirror of pruning_mask: control flow never reads the device
        self.current: Optional[int] = None

    @property
    def n_tasks(self) -> int:
        return len(self.alpha)

    def add_task(self, task: int, alpha_init: float) -> None:
        """Register task ``task`` (0-based, in order) as the current, trainable adapter."""
        if task != self.n_tasks:
            raise ValueError(f"tasks are added in order: expected task {self.n_tasks}, got {task}")
        self.alpha[str(task)] = nn.Parameter(torch.tensor(float(alpha_init), device=self.pruning_mask.device))
        self.pruning_mask = torch.cat([self.pruning_mask, self.pruning_mask.new_ones(1)])
        self._active.append(True)
        self.current = task

    def reset_alphas(self, value: float) -> None:
        with torch.no_grad():
            for a in self.alpha.values():
                a.fill_(value)

    def active_tasks(self) -> list[int]:
        return [t for t, on in enumerate(self._active) if on]

    def frozen_active(self) -> list[int]:
        """Active adapters other than the current one, in coefficient order."""
        return [t for t in self.active_tasks() if t != self.current]

    def prune(self, tasks) -> None:
        """Prune adapters for good (their mask entry goes to 0 and never comes back)."""
        for t in tasks:
            self.pruning_mask[t] = 0
            self._active[t] = False

    def load_mask(self, mask: torch.Tensor) -> None:
        """Take a saved mask (for the first len(mask) tasks); pruned entries stay pruned."""
        n = min(len(mask), self.n_tasks)
        self.prune([t for t in range(n) if float(mask[t]) <= 0])

    def alphas(self, tasks: list[int]) -> torch.Tensor:
        return torch.stack([self.alpha[str(t)] for t in tasks])

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(w, beta): w has shape (1 or n_layers, n_active) in coefficient order; beta is None here."""
        tasks = self.frozen_active() + ([self.current] if self._current_active() else [])
        return (self.alphas(tasks)[None] if tasks else None), None

    def _current_active(self) -> bool:
        return self.current is not None and self._active[self.current]


class GumbelGate(AdapterGate):
    """alpha, logits l (init 0) and pruning mask; g = beta from Gumbel-Sparsemax."""

    def __init__(self, n_layers: int, granularity: str = "task", scope: str = "all"):
        super().__init__(n_layers)
        if granularity not in ("task", "layer") or scope not in ("all", "previous"):
            raise ValueError(f"bad gate settings granularity={granularity!r} scope={scope!r}")
        self.granularity, self.scope = granularity, scope
        self.logits = nn.ParameterDict()
        self.register_buffer("tau_eval", torch.tensor(1.0))
        self.tau: float = 1.0      # training temperature, set by the learner every step
        self.noise: bool = True    # Gumbel noise in training (off in phase 2 and in eval)

    def add_task(self, task: int, alpha_init: float) -> None:
        super().add_task(task, alpha_init)
        rows = self.n_layers if self.granularity == "layer" else 1
        self.logits[str(task)] = nn.Parameter(torch.zeros(rows, device=self.pruning_mask.device))

    def gated_tasks(self) -> list[int]:
        """The adapters whose g is beta: every active one, or the old ones with scope 'previous'."""
        tasks = self.frozen_active()
        if self.scope == "all" and self._current_active():
            tasks = tasks + [self.current]
        return tasks

    def beta(self, tau: float, noise: bool) -> torch.Tensor:
        """beta over the gated adapters: (rows, n_gated), rows = 1 or n_layers."""
        tasks = self.gated_tasks()
        logits = torch.stack([self.logits[str(t)] for t in tasks], dim=-1)  # (rows, n)
        return gumbel_sparsemax(logits, tau, noise=noise)

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        gated = self.gated_tasks()
        train = self.training
        tau = self.tau if train else float(self.tau_eval)
        beta = self.beta(tau, noise=train and self.noise) if gated else None
        w = self.alphas(gated)[None] * beta if gated else None
        if self.scope == "previous" and self._current_active():
            cur = self.alpha[str(self.current)].reshape(1, 1)
            w = cur if w is None else torch.cat([w, cur.expand(w.shape[0], 1)], dim=1)
        return w, beta
