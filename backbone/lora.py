"""Per-task LoRA adapters on the q/k/v slices of a frozen fused ``attn.qkv`` (SPEC section 2).

For target slice p and active adapters S, the layer adds ``sum_{i in S} w_i B_i A_i x`` where
``w_i = coeff_i / n_i`` for frozen adapters (n_i: their norm in this block and slice, computed once)
and ``w_t = coeff_t`` for the trainable current adapter. ``coeff`` comes from the gate each step.

Adapter state is held per task (``lora_A``/``lora_B`` dicts keyed by task id, frozen vs trainable
explicit through ``requires_grad``). The frozen active adapters are also kept concatenated along
the rank axis, so the sum is one low-rank product whatever the number of tasks:

- ``stacked``: h = x A^T (all ranks at once), y += (h * s) B^T. Cost ~ tokens x d x total rank.
- ``merged``: a delta weight D = B diag(s) A per slice is formed each step and applied through
  ``_DeltaLinear``, whose backward returns the gradient of D for the target slices only and keeps
  no per-adapter activations. Cost ~ tokens x d^2 per slice, flat in the number of tasks.
- ``fused``: the same merged forward (``FusedLowRank``), whose backward gives the scales and the current
  adapter's A, B their gradients from X and dY directly while the total rank is small (3 R < d), and
  through dY^T X past that (backbone/lora_autograd.py).
- ``loop``: one small product per adapter, norms recomputed every step: the published code's way,
  kept as the reference for tests and benchmarks.
- ``auto``: ``auto_strategy``: merged on CUDA, fused on the CPU.

In eval mode the whole sum is merged into a cached copy of the qkv weight, so inference costs
exactly what the plain ViT costs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbone.lora_autograd import FusedLowRank, _DeltaLinear, add_to_slices  # noqa: F401  (_DeltaLinear: tests)

SLICES = {"q": 0, "k": 1, "v": 2}
STRATEGIES = ("auto", "fused", "stacked", "merged", "loop")


def adapter_norm(A: torch.Tensor, B: torch.Tensor, kind: str) -> torch.Tensor:
    """Norm of each slice's direction B A, per slice: (P,) for A (P, r, d) and B (P, d, r).

    ``factors``: ||A||_F ||B||_F. ``frobenius``: ||B A||_F from r x r Gram matrices,
    ||BA||_F^2 = trace((B^T B)(A A^T)), without forming the d x d product.
    """
    if kind == "factors":
        return A.flatten(1).norm(dim=1) * B.flatten(1).norm(dim=1)
    if kind == "none":  # the direction keeps its trained scale
        return A.new_ones(A.shape[0])
    if kind == "frobenius":
        gram = (B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))  # elementwise: trace(X Y) = sum X * Y^T
        return gram.sum(dim=(1, 2)).clamp_min(0).sqrt()
    raise ValueError(f"unknown direction_norm '{kind}'; use 'factors' or 'frobenius'")


def direction_inner(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product <B1 A1, B2 A2> per slice, (P,), from r x r products only:
    trace(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T))."""
    return ((B1.transpose(1, 2) @ B2) * (A1 @ A2.transpose(1, 2))).sum(dim=(1, 2))


def auto_strategy(cuda: bool) -> str:
    """What ``auto`` runs. CUDA: merged (on an H200, ViT-B/16, batch 128, bf16, it was ahead of stacked at every
    number of adapters measured: 1.085 / 1.074 / 1.142x a plain ViT's step at t = 1 / 10 / 20, stacked 1.168 /
    1.202 / 1.300; fused is not measured there yet). CPU: fused, the merged forward with the factored backward
    (benchmarks/adapters.py; README "Adapters: constant cost in the number of tasks")."""
    return "merged" if cuda else "fused"


class LoRAQKV(nn.Module):
    """A frozen fused qkv Linear (d -> 3d) with per-task low-rank adapters on some of its slices."""

    def __init__(self, qkv: nn.Linear, targets: Sequence[str] = ("q", "v"), direction_norm: str = "factors",
                 strategy: str = "auto"):
        super().__init__()
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"expected a fused qkv Linear(d, 3d), got {qkv}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown adapter strategy '{strategy}'; use one of {STRATEGIES}")
        self.base = qkv
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.dim = qkv.in_features
        self.targets = tuple(targets)
        self.offsets = tuple(SLICES[t] * self.dim for t in self.targets)
        self.direction_norm = direction_norm
        self.norm_kind: dict[int, str] = {}  # adapters normalised otherwise than direction_norm (SubLoRA "none")
        self.strategy = strategy
        self.lora_A = nn.ParameterDict()  # task id -> (P, r, d)
        self.lora_B = nn.ParameterDict()  # task id -> (P, d, r)
        self.frozen: list[int] = []       # active frozen adapters, in coefficient order
        self.current: Optional[int] = None
        P = len(self.targets)
        ref = qkv.weight
        self.register_buffer("_A_old", ref.new_zeros(P, 0, self.dim), persistent=False)
        self.register_buffer("_B_old", ref.new_zeros(P, self.dim, 0), persistent=False)
        self.register_buffer("_inv_norm", ref.new_zeros(P, 0), persistent=False)
        self.register_buffer("_row_owner", torch.zeros(0, dtype=torch.long, device=ref.device), persistent=False)
        self._ranks_old: list[int] = []
        self.coeff: Optional[torch.Tensor] = None  # (n_frozen [+ 1],) set by the model every forward
        # the current adapter's (A, B) when they are computed elsewhere (SubLoRA: theta_0 + P z), set with coeff
        self.current_override: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._merged: Optional[torch.Tensor] = None
        self.bypass = False  # True: the frozen qkv alone, every adapter left out (LoRAViT.pretrained_only)
        # a frozen snapshot (A (P, R, d), B (P, d, R), s (P, R)) used instead of the live adapters (LoRAViT.viewing)
        self.view: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    # ---- adapter bookkeeping ------------------------------------------------------------------
    def add_adapter(self, task: int, rank: int) -> None:
        """A new trainable adapter: A Kaiming-uniform(a=sqrt(5)), B zeros, one pair per slice."""
        P, d = len(self.targets), self.dim
        A = torch.empty(P, rank, d, device=self.base.weight.device, dtype=self.base.weight.dtype)
        for p in range(P):
            nn.init.kaiming_uniform_(A[p], a=math.sqrt(5))
        self.lora_A[str(task)] = nn.Parameter(A)
        self.lora_B[str(task)] = nn.Parameter(torch.zeros(P, d, rank, device=A.device, dtype=A.dtype))

    def configure(self, frozen: Sequence[int], current: Optional[int]) -> None:
        """Set which adapters take part: frozen ones (stacked, norms computed now) and the current one.

        Only the current adapter keeps ``requires_grad``; adapters not named cost nothing.
        """
        for k in self.lora_A:
            train = current is not None and int(k) == current
            self.lora_A[k].requires_grad_(train)
            self.lora_B[k].requires_grad_(train)
        self.frozen, self.current = list(frozen), current
        self._merged = None
        P = len(self.targets)
        if not self.frozen:
            self._A_old = self._A_old.new_zeros(P, 0, self.dim)
            self._B_old = self._B_old.new_zeros(P, self.dim, 0)
            self._inv_norm = self._inv_norm.new_zeros(P, 0)
            self._row_owner = self._row_owner.new_zeros(0)
            self._ranks_old = []
            return
        with torch.no_grad():
            As = [self.lora_A[str(i)].detach() for i in self.frozen]
            Bs = [self.lora_B[str(i)].detach() for i in self.frozen]
            self._A_old = torch.cat(As, dim=1).contiguous()
            self._B_old = torch.cat(Bs, dim=2).contiguous()
            self._share_storage()
            norms = torch.stack([adapter_norm(a, b, self.norm_of(i)) for i, a, b in zip(self.frozen, As, Bs)], dim=1)
            # (P, n_frozen). An adapter that never trained (B = 0) has no direction: it adds 0, not NaN.
            self._inv_norm = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            self._ranks_old = [a.shape[1] for a in As]
            # rank row -> its adapter's position, so per-step scales are one gather (no host transfer)
            owner = [i for i, r in enumerate(self._ranks_old) for _ in range(r)]
            self._row_owner = torch.tensor(owner, dtype=torch.long, device=self._A_old.device)

    def _share_storage(self) -> None:
        """Frozen adapters are stored once: their per-task tensors become views into the stack.
        Adapters left out of the stack (pruned) get their own copy, so an old stack can be freed."""
        start = 0
        for i in self.frozen:
            k = str(i)
            r = self.lora_A[k].shape[1]
            self.lora_A[k].data = self._A_old[:, start:start + r]
            self.lora_B[k].data = self._B_old[:, :, start:start + r]
            start += r
        for k in self.lora_A:
            if int(k) not in self.frozen and int(k) != self.current:
                self.lora_A[k].data = self.lora_A[k].data.clone()
                self.lora_B[k].data = self.lora_B[k].data.clone()

    def norm_of(self, task: int) -> str:
        """How adapter ``task``'s direction is normalised once frozen."""
        return self.norm_kind.get(task, self.direction_norm)

    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current adapter's (A, B): its own parameters, or the override computed for this step."""
        if self.current_override is not None:
            return self.current_override
        k = str(self.current)
        return self.lora_A[k], self.lora_B[k]

    @property
    def n_active(self) -> int:
        return len(self.frozen) + (self.current is not None)

    @property
    def total_rank(self) -> int:
        cur = self.lora_A[str(self.current)].shape[1] if self.current is not None else 0
        return sum(self._ranks_old) + cur

    # ---- the adapter sum -----------------------------------------------------------------------
    def _scales(self, coeff: torch.Tensor) -> torch.Tensor:
        """Per-rank-row scales s (P, R): coeff_i / n_i for frozen adapters, coeff_t for the current."""
        n_old = len(self.frozen)
        parts = []
        if n_old:
            w_old = coeff[:n_old].to(self._inv_norm.dtype) * self._inv_norm  # (P, n_old)
            parts.append(w_old.index_select(1, self._row_owner))
        if self.current is not None:
            r = self.lora_A[str(self.current)].shape[1]
            parts.append(coeff[n_old].to(self._A_old.dtype).expand(len(self.targets), r))
        return torch.cat(parts, dim=1)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All active adapters concatenated along the rank: A (P, R, d), B (P, d, R)."""
        if self.current is None:
            return self._A_old, self._B_old
        A, B = self.current_factors()
        if not self.frozen:
            return A, B
        return torch.cat([self._A_old, A], 1), torch.cat([self._B_old, B], 2)

    def delta_weight(self, coeff: torch.Tensor) -> torch.Tensor:
        """The adapters' weight change per slice, (P, d, d) = B diag(s) A.

        The frozen stack and the current adapter are multiplied apart: the frozen factors are
        buffers, so autograd keeps no per-step copy of them (memory flat in the number of tasks).
        """
        s = self._scales(coeff)
        n_old = sum(self._ranks_old)
        delta = None
        if self.frozen:
            delta = torch.bmm(self._B_old * s[:, None, :n_old], self._A_old)
        if self.current is not None:
            A, B = self.current_factors()
            cur = torch.bmm(B * s[:, None, n_old:], A)
            delta = cur if delta is None else delta + cur
        return delta

    def _forward_stacked(self, x2: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        A, B = self._factors()
        s = self._scales(coeff)
        P, R, d = A.shape[0], A.shape[1], self.dim
        h = (x2 @ A.reshape(P * R, d).t()) * s.reshape(1, P * R)  # (N, P*R): every slice and adapter at once
        # B laid out against the whole qkv output (zeros outside the target slices), so the sum lands
        # in one fused GEMM on top of the frozen projection, with no strided in-place slice updates
        B_full = B.new_zeros(3 * d, P * R)
        for p, o in enumerate(self.offsets):
            B_full[o:o + d, p * R:(p + 1) * R] = B[p]
        return torch.addmm(F.linear(x2, self.base.weight, self.base.bias), h, B_full.t())

    def _forward_fused(self, x2: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        A, B = self.current_factors() if self.current is not None else (None, None)
        return FusedLowRank.apply(x2, self.base.weight, self.base.bias, self._A_old, self._B_old, A, B,
                                  self._scales(coeff), self.offsets)

    def _forward_merged(self, x2: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        return _DeltaLinear.apply(x2, self.base.weight, self.base.bias, self.delta_weight(coeff), self.offsets)

    def _forward_loop(self, x2: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        """Reference: one small product per adapter, norms recomputed every step."""
        out = self.base(x2)
        d = self.dim
        tasks = self.frozen + ([self.current] if self.current is not None else [])
        for j, task in enumerate(tasks):
            A, B = self.current_factors() if task == self.current else (self.lora_A[str(task)], self.lora_B[str(task)])
            norm = adapter_norm(A, B, self.norm_of(task)) if task != self.current else None
            if norm is not None:
                norm = torch.where(norm > 0, norm, torch.full_like(norm, float("inf")))  # zero adapter adds 0
            for p, o in enumerate(self.offsets):
                w = coeff[j] / norm[p] if norm is not None else coeff[j]
                out[:, o:o + d] = out[:, o:o + d] + w * ((x2 @ A[p].t()) @ B[p].t())
        return out

    def snapshot(self, coeff: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapter sum under ``coeff`` as one low-rank triple (A, B, s), copied: later training leaves it as
        it is. Empty (rank 0) when no adapter takes part."""
        with torch.no_grad():
            if coeff is None or not self.n_active:
                P = len(self.targets)
                w = self.base.weight
                return w.new_zeros(P, 0, self.dim), w.new_zeros(P, self.dim, 0), w.new_zeros(P, 0)
            A, B = self._factors()
            return A.detach().clone(), B.detach().clone(), self._scales(coeff).detach().clone()

    def _forward_view(self, x2: torch.Tensor) -> torch.Tensor:
        """The frozen qkv plus the snapshot in ``view``: W x + B diag(s) A x on each target slice."""
        A, B, s = self.view
        out = F.linear(x2, self.base.weight, self.base.bias)
        for p, o in enumerate(self.offsets):
            out[:, o:o + self.dim] += ((x2 @ A[p].t()) * s[p].to(x2.dtype)) @ B[p].t()
        return out

    def merge(self, coeff: torch.Tensor) -> None:
        """Cache W + delta for inference; ``unmerge`` (or any reconfiguration) drops it."""
        with torch.no_grad():
            w = self.base.weight.detach()
            self._merged = add_to_slices(w, self.delta_weight(coeff), self.offsets) if self.n_active else w.clone()

    @torch.no_grad()
    def fold_into_base(self, task: int) -> None:
        """W += B A of adapter ``task`` at weight 1, for good (InfLoRA after each task, APER after task 0)."""
        A, B = self.lora_A[str(task)], self.lora_B[str(task)]
        for p, o in enumerate(self.offsets):
            self.base.weight[o:o + self.dim] += B[p] @ A[p]

    def unmerge(self) -> None:
        self._merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        if self.view is not None:
            return self._forward_view(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        if self._merged is not None:
            return F.linear(x, self._merged.to(x.dtype), self.base.bias)
        if self.n_active == 0:
            return self.base(x)
        if self.coeff is None:
            raise RuntimeError("LoRAQKV.coeff is unset: run the layer through its LoRAViT")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        strategy = self.strategy
        if strategy == "auto":
            strategy = auto_strategy(x2.is_cuda)
        fwd = {"fused": self._forward_fused, "stacked": self._forward_stacked, "merged": self._forward_merged,
               "loop": self._forward_loop}
        return fwd[strategy](x2, self.coeff).reshape(*shape[:-1], -1)

    def extra_repr(self) -> str:
        return (f"targets={self.targets}, adapters={len(self.lora_A)}, frozen_active={self.frozen}, "
                f"current={self.current}, strategy={self.strategy}")
