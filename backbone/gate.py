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

    def revive(self, task: int) -> None:
        """Undo a prune taken earlier in the same task, before anything was saved (a trial that lost)."""
        self.pruning_mask[task] = 1
        self._active[task] = True

    def load_mask(self, mask: torch.Tensor) -> None:
        """Take a saved mask (for the first len(mask) tasks); pruned entries stay pruned."""
        n = min(len(mask), self.n_tasks)
        self.prune([t for t in range(n) if float(mask[t]) <= 0])

    def alphas(self, tasks: list[int]) -> torch.Tensor:
        return torch.stack([self.alpha[str(t)] for t in tasks])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the gate: every alpha and the mask ({} before any task)."""
        if not self.n_tasks:
            return {}
        return {"gate.alpha": self.alphas(list(range(self.n_tasks))), "gate.pruning_mask": self.pruning_mask}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back ``state_tensors`` (the tasks were added again first)."""
        if "gate.alpha" not in tensors:
            return
        for t, a in enumerate(tensors["gate.alpha"]):
            self.alpha[str(t)].fill_(float(a))
        self.load_mask(tensors["gate.pruning_mask"])

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(w, beta): w has shape (1 or n_layers, n_active) in coefficient order; beta is None here."""
        tasks = self.frozen_active() + ([self.current] if self._current_active() else [])
        return (self.alphas(tasks)[None] if tasks else None), None

    def _current_active(self) -> bool:
        return self.current is not None and self._active[self.current]


class IsolatedGate(AdapterGate):
    """Per-task plain LoRA (lora_task_id): only the current adapter takes part, with w = 1; the others
    stay stored, and evaluation makes each one current in turn for its own task's images."""

    def add_task(self, task: int, alpha_init: float) -> None:
        super().add_task(task, 1.0)
        self.alpha[str(task)].requires_grad_(False)

    def frozen_active(self) -> list[int]:
        return []


class FoldGate(AdapterGate):
    """SD-LoRA-KD: w_i = alpha_i + fold_i, where ``fold`` (a buffer, never reset nor trained) holds the
    coefficients of dropped adapters folded into the earlier magnitudes."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.register_buffer("fold", torch.zeros(0))

    def add_task(self, task: int, alpha_init: float) -> None:
        super().add_task(task, alpha_init)
        self.fold = torch.cat([self.fold, self.fold.new_zeros(1)])

    def magnitude(self, task: int) -> torch.Tensor:
        return self.alpha[str(task)] + self.fold[task]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(super().state_tensors(), **{"gate.fold": self.fold})

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(tensors)
        self.fold.copy_(tensors["gate.fold"])

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tasks = self.frozen_active() + ([self.current] if self._current_active() else [])
        return (torch.stack([self.magnitude(t) for t in tasks])[None] if tasks else None), None


class GumbelGate(AdapterGate):
    """alpha, logits l (init 0) and pruning mask; g = beta from Gumbel-Sparsemax.

    Scopes: ``all`` gates every active adapter, ``previous`` the old ones (g_t = 1), ``new`` only the
    current adapter, against a skip option whose logit is fixed at 0 (beta_t = 0: "no new adapter");
    old adapters then keep the gate value their own task ended with (``anchor``), so a later task never
    moves them. ``ungated`` (the warm-up) takes the current adapter out of the gate: g_t = 1.
    """

    def __init__(self, n_layers: int, granularity: str = "task", scope: str = "all"):
        super().__init__(n_layers)
        if granularity not in ("task", "layer") or scope not in ("all", "previous", "new"):
            raise ValueError(f"bad gate settings granularity={granularity!r} scope={scope!r}")
        self.granularity, self.scope = granularity, scope
        self.logits = nn.ParameterDict()
        self.register_buffer("tau_eval", torch.tensor(1.0))
        self.register_buffer("anchor", torch.ones(0))  # scope 'new': fixed g of each adapter after its task
        self._anchor: list[float] = []  # host mirror: the hot path multiplies by floats, no device reads
        self.tau: float = 1.0      # training temperature, set by the learner every step
        self.noise: bool = True    # Gumbel noise in training (off in phase 2 and in eval)
        self.ungated: bool = False  # warm-up: the current adapter has g = 1 and is not in the gate

    @property
    def rows(self) -> int:
        return self.n_layers if self.granularity == "layer" else 1

    def add_task(self, task: int, alpha_init: float) -> None:
        super().add_task(task, alpha_init)
        self.logits[str(task)] = nn.Parameter(torch.zeros(self.rows, device=self.pruning_mask.device))
        self.anchor = torch.cat([self.anchor, self.anchor.new_ones(1)])
        self._anchor.append(1.0)

    def set_anchor(self, task: int, value: float) -> None:
        """Fix adapter ``task``'s gate value for every later task (scope 'new')."""
        self.anchor[task] = value
        self._anchor[task] = float(value)

    def anchor_of(self, task: int) -> float:
        return self._anchor[task]

    def load_anchor(self, anchor: torch.Tensor) -> None:
        for t, v in enumerate(anchor.tolist()[:self.n_tasks]):
            self.set_anchor(t, v)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """alphas and mask, then the logits, the evaluation temperature and the anchors."""
        if not self.n_tasks:
            return {}
        return dict(super().state_tensors(), **{
            "gate.logits": torch.stack([self.logits[str(t)] for t in range(self.n_tasks)]),
            "gate.tau_eval": self.tau_eval, "gate.anchor": self.anchor})

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(tensors)
        for t, row in enumerate(tensors["gate.logits"]):
            self.logits[str(t)].copy_(row)
        self.tau_eval.copy_(tensors["gate.tau_eval"])
        if "gate.anchor" in tensors:
            self.load_anchor(tensors["gate.anchor"])

    def gated_tasks(self) -> list[int]:
        """The adapters whose g is beta (coefficient order), by scope; the current one not while ungated."""
        cur = [self.current] if self._current_active() and not self.ungated else []
        if self.scope == "new":
            return cur
        return self.frozen_active() + (cur if self.scope == "all" else [])

    def beta(self, tau: float, noise: bool) -> torch.Tensor:
        """Gumbel-Sparsemax over the gated adapters: (rows, n_gated), plus, with scope 'new', a last
        column for the skip option (logit 0)."""
        tasks = self.gated_tasks()
        logits = torch.stack([self.logits[str(t)] for t in tasks], dim=-1)  # (rows, n)
        if self.scope == "new":
            logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=-1)
        return gumbel_sparsemax(logits, tau, noise=noise)

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """w_i = alpha_i * g_i in coefficient order (frozen active, then current); g = beta for gated
        adapters, the anchor for old ones under scope 'new', 1 otherwise."""
        gated = self.gated_tasks()
        tau = self.tau if self.training else float(self.tau_eval)
        beta = self.beta(tau, noise=self.training and self.noise) if gated else None
        col = {t: j for j, t in enumerate(gated)}
        tasks = self.frozen_active() + ([self.current] if self._current_active() else [])
        if not tasks:
            return None, beta
        cols = []
        for t in tasks:
            a = self.alpha[str(t)]
            if t in col:
                cols.append(a * beta[:, col[t]])
            elif self.scope == "new" and t != self.current:
                cols.append((a * self.anchor_of(t)).expand(self.rows))
            else:
                cols.append(a.expand(self.rows))
        return torch.stack(cols, dim=-1), beta
