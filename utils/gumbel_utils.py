"""Gumbel noise, sparsemax, Gumbel-Sparsemax, the entropy sparsity loss and the temperature schedule.

Pure math on tensors (SPEC section 3). Sparsemax is the Euclidean projection onto the probability
simplex (Martins & Astudillo, 2016): it has exact zeros and a closed-form Jacobian.
"""
from __future__ import annotations

from typing import Optional

import torch


class _Sparsemax(torch.autograd.Function):
    """Sparsemax over the last dimension with the exact (support-restricted) gradient."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        z = z - z.max(dim=-1, keepdim=True).values  # shift-invariant; keeps large logits finite
        zs, _ = torch.sort(z, dim=-1, descending=True)
        k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        cssv = zs.cumsum(dim=-1) - 1
        support = (zs * k > cssv).to(z.dtype)          # 1 + k z_(k) > sum_{j<=k} z_(j)
        k_z = support.sum(dim=-1, keepdim=True)        # support size, >= 1
        tau = cssv.gather(-1, k_z.long() - 1) / k_z
        p = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        on = (p > 0).to(grad.dtype)
        mean = (grad * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
        return on * (grad - mean)


def sparsemax(z: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sparsemax of z over its last dimension, restricted to the entries where ``active`` is true.

    Inactive entries are left out of the projection (not pushed to -inf): they get exactly 0 and
    no gradient. ``active`` is a bool vector over the last dimension.
    """
    if active is None:
        return _Sparsemax.apply(z)
    idx = torch.nonzero(active, as_tuple=False).flatten()
    if idx.numel() == 0:
        raise ValueError("sparsemax needs at least one active entry")
    p = _Sparsemax.apply(z.index_select(-1, idx))
    return torch.zeros_like(z).index_copy(-1, idx, p)


def sample_gumbel(shape, generator: Optional[torch.Generator] = None, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, -log(-log U), with U kept strictly inside (0, 1)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)
    return -torch.log(-torch.log(u))


def gumbel_sparsemax(logits: torch.Tensor, tau: float, active: Optional[torch.Tensor] = None,
                     noise: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """beta = sparsemax((l + G) / tau) over the active entries; G = 0 when ``noise`` is false."""
    z = logits
    if noise:
        z = z + sample_gumbel(logits.shape, generator, logits.device, logits.dtype)
    return sparsemax(z / tau, active)


def sparsity_loss(beta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Entropy Omega(beta) = -sum_i beta_i log(beta_i + eps), summed over the last dimension
    and averaged over any leading (per-layer) rows; 0 when a single entry holds all the mass."""
    ent = -(beta * torch.log(beta + eps)).sum(-1)
    return ent.mean()


def temperature(step: int, tau_init: float, tau_final: float, rate: float) -> float:
    """tau(s) = tau_final + (tau_init - tau_final) * rate**s, s = optimiser steps in this task."""
    return tau_final + (tau_init - tau_final) * rate ** step


def phase_temperature(step: int, total: int, tau_init: float, tau_final: float) -> float:
    """Geometric from tau_init (first step) to tau_final (last step) over a phase of ``total`` steps,
    so where tau ends does not depend on the dataset size."""
    f = min(step / (total - 1), 1.0) if total > 1 else 1.0
    return tau_init * (tau_final / tau_init) ** f
