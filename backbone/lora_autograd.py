"""The adapter sum's autograd functions: a frozen qkv Linear plus low-rank deltas on some of its slices.

Both run the forward as one GEMM with the merged weight (what the plain layer costs) and give the frozen
weight and bias no gradient. They differ in the backward:

- ``_DeltaLinear`` takes the delta per slice (P, d, d) and returns its gradient dY_p^T X (N d^2 per slice);
  autograd then carries it through delta = B diag(s) A.
- ``FusedLowRank`` takes the frozen stack, the current adapter's factors and per-rank scales and returns grad s,
  and grad A, B for the current adapter only, from X and dY directly (H = X A^T, G = dY_p B: 2 N d R per slice)
  while 3 R < d, so no d x d gradient is formed; at larger total rank R it goes through dY_p^T X, which is then
  cheaper (one thread, N = 2080 tokens, d = 384: 1.0 / 2.9 / 4.0 ms per slice at R = 10 / 100 / 150 against
  3.3-3.7 ms).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def add_to_slices(weight: torch.Tensor, blocks, offsets) -> torch.Tensor:
    """A copy of ``weight`` with ``blocks[p]`` (d x d) added to rows [o_p, o_p + d) of each target slice p."""
    w = weight.clone()
    for p, o in enumerate(offsets):
        w[o:o + blocks[p].shape[0]] += blocks[p].to(w.dtype)
    return w


class _DeltaLinear(torch.autograd.Function):
    """y = x (W + D)^T + b, where D adds ``delta[p]`` to rows [o_p, o_p + d) and W, b are frozen.

    The backward returns grad x and grad delta (one d x d block per slice) and nothing for W, so it
    costs one extra d x d product per slice instead of a full weight gradient.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, delta, offsets):
        w = _DeltaLinear.merged(weight, delta, offsets)
        ctx.save_for_backward(x, weight, delta)  # delta (P d^2), not the merged W (3 d^2): rebuilt below
        ctx.offsets, ctx.delta_dtype = offsets, delta.dtype
        return F.linear(x, w, bias)

    @staticmethod
    def merged(weight, delta, offsets):
        return add_to_slices(weight, delta, offsets)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        x, weight, delta = ctx.saved_tensors
        w = _DeltaLinear.merged(weight, delta, ctx.offsets)
        gx = g @ w.to(g.dtype) if ctx.needs_input_grad[0] else None
        gd = None
        if ctx.needs_input_grad[3]:
            d = w.shape[1]
            gd = torch.stack([g[:, o:o + d].t() @ x.to(g.dtype) for o in ctx.offsets]).to(ctx.delta_dtype)
        return gx, None, None, gd, None


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor, offsets) -> torch.Tensor:
    """W + sum over slices p of B_p diag(s_p) A_p on rows [o_p, o_p + d)."""
    return add_to_slices(weight, slice_blocks(A, B, s), offsets)


def slice_blocks(A: torch.Tensor, B: torch.Tensor, s: torch.Tensor) -> list[torch.Tensor]:
    """Each target slice's weight change B_p diag(s_p) A_p (d x d)."""
    return [(B[p] * s[p]) @ A[p] for p in range(A.shape[0])]


def joined(old: torch.Tensor, cur: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """The frozen stack and the current adapter's factors as one tensor along the rank (a temporary)."""
    if cur is None:
        return old
    return cur if old.shape[dim] == 0 else torch.cat([old, cur], dim)


class FusedLowRank(torch.autograd.Function):
    """y = x (W + sum_p B_p diag(s_p) A_p)^T + b, where A = [A_old, A_cur] (P, R, d) and B = [B_old, B_cur]
    (P, d, R) along the rank and s (P, R): the frozen stack (A_old, B_old: only their scales get a gradient) and the
    current adapter (A_cur, B_cur, or None), given apart so that no per-step copy of the stack is kept.

    Saved for the backward: references to the inputs and the slices' d x d weight changes (P d^2, whatever the
    number of adapters), so the backward neither re-forms the merged weight nor holds a copy growing with R.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, A_old, B_old, A_cur, B_cur, s, offsets):
        blocks = slice_blocks(joined(A_old, A_cur, 1), joined(B_old, B_cur, 2), s)
        ctx.save_for_backward(x, weight, A_old, B_old, A_cur, B_cur, s, *blocks)
        ctx.offsets = offsets
        return F.linear(x, add_to_slices(weight, blocks, offsets), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        x, weight, A_old, B_old, A_cur, B_cur, s, *blocks = ctx.saved_tensors
        need_x, need_a, need_b, need_s = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        A, B = joined(A_old, A_cur, 1), joined(B_old, B_cur, 2)  # temporaries of this backward only
        gx = g @ add_to_slices(weight, blocks, ctx.offsets).to(g.dtype) if need_x else None
        gA = torch.zeros_like(A_cur) if need_a else None
        gB = torch.zeros_like(B_cur) if need_b else None
        gs = torch.zeros_like(s) if need_s else None
        f, d, R = A_old.shape[1], A.shape[-1], A.shape[1]
        xg, Ag, Bg, sg = (t.to(g.dtype) for t in (x, A, B, s))
        for p, o in enumerate(ctx.offsets):
            gp = g[:, o:o + d]
            if 3 * R < d:  # from X and dY: H = X A^T, G = dY_p B, (N, R) each
                H, G = xg @ Ag[p].t(), gp @ Bg[p]
                if need_s:
                    gs[p] = (H * G).sum(0)
                if need_a:
                    gA[p] = ((G[:, f:] * sg[p, f:]).t() @ xg).to(A.dtype)
                if need_b:
                    gB[p] = (gp.t() @ (H[:, f:] * sg[p, f:])).to(B.dtype)
            else:  # through the d x d gradient of the slice's delta, dL/dD_p = dY_p^T X
                gd = gp.t() @ xg
                gdA = gd @ Ag[p].t()  # (d, R)
                if need_s:
                    gs[p] = (gdA * Bg[p]).sum(0)
                if need_a:
                    gA[p] = (sg[p, f:, None] * (Bg[p][:, f:].t() @ gd)).to(A.dtype)
                if need_b:
                    gB[p] = (gdA[:, f:] * sg[p, f:]).to(B.dtype)
        return gx, None, None, None, None, gA, gB, gs, None
