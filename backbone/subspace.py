"""SubLoRA (SPEC section 6): the current task's LoRA factors trained in a d-dimensional random subspace.

theta = theta_0 + P z. theta_0 is the usual LoRA initialisation (A Kaiming-uniform, B zero) and P a
fixed random projection, both regenerated from one seed; z (d numbers) and, for ``learned``, one
split logit per block are all that train and all a checkpoint of the task stores.

The projection is sparse: every row of P (one LoRA parameter) has ``NNZ`` nonzeros +-c_j at uniformly
drawn columns j, with c_j = 1/sqrt(entries in column j), so every column has unit norm. Memory and time
are O(n_params * NNZ), never n_params x d (dense P for ViT-S, rank 10 on q and v, d = 2000 would be
1.5 GB). Unit columns make P an isometry on average, E[P^T P] = I_d:
- ||theta - theta_0|| = ||P z|| ~ ||z||, whatever d and however many parameters P feeds;
- an SGD step on z moves theta by lr times the projection of its gradient onto the d-dimensional
  subspace: budgets d are compared at the same step rule (``subspace_lr`` sets lr for z).
Rows of unit norm instead (entries +-1/sqrt(NNZ)) would make ||P z|| ~ sqrt(n/d) ||z||: the step
size would grow as d shrinks (measured: at d = 1000 and lrate 8e-3, ||B A|| ended 17x that of plain
LoRA's after one task). A Kronecker product of small dense matrices would also be O(n_params), but it
needs n_params and d to factor (184,320 and 1,000 do not nicely) and ties rows into blocks; the sparse
projection (a sparse Johnson-Lindenstrauss transform) fits every shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

NNZ = 8          # nonzeros per row of P: enough to mix coordinates, small enough to cost ~nothing
MASK_STEEPNESS = 10.0  # C of the learned soft mask m_j = sigmoid(C (gamma_l d_l - j))
MODES = ("uniform", "fixed", "learned")


@dataclass(frozen=True)
class SubspaceSpec:
    """What a task's subspace is: its budget d, how d is split between A and B, and its seed."""

    dim: int
    mode: str = "uniform"
    ratio: float = 0.5  # fixed: d_B / d
    seed: int = 0
    norm: str = "direction_norm"  # once frozen: divided by the layers' direction norm, or "none" (n = 1)


class SparseProjection:
    """P (n x d) with ``nnz`` entries per row, +-1/sqrt(entries in their column); row i reads [lo_i, hi_i).

    ``lo``/``hi`` are per-row bounds, so one projection can send each group of rows (A or B, or one
    block's rows) into its own range of z. Generated on the CPU from ``generator`` (same seed, same P).
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator, nnz: int = NNZ):
        n = lo.numel()
        u = torch.rand(n, nnz, generator=generator, dtype=torch.float64)
        self.index = (lo[:, None] + (u * (hi - lo)[:, None].double()).long().clamp_max((hi - lo - 1)[:, None]))
        sign = torch.randint(0, 2, (n, nnz), generator=generator).float() * 2 - 1
        per_column = torch.bincount(self.index.flatten(), minlength=int(hi.max()) if n else 0).clamp_min(1)
        self.value = sign / per_column[self.index].float().sqrt()  # unit columns

    def to(self, device: torch.device, dtype: torch.dtype) -> "SparseProjection":
        self.index, self.value = self.index.to(device), self.value.to(device=device, dtype=dtype)
        return self

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """P z, (n,): a gather and a sum over each row's nnz entries; autograd gives P^T g."""
        return (z[self.index] * self.value).sum(dim=1)

    def dense(self, d: int) -> torch.Tensor:
        """The matrix itself (tests only): duplicate columns in a row add up."""
        P = torch.zeros(self.index.shape[0], d, dtype=self.value.dtype, device=self.value.device)
        return P.index_put_((torch.arange(len(P), device=P.device)[:, None].expand_as(self.index), self.index),
                            self.value, accumulate=True)


def stored_numbers(stored: dict[str, torch.Tensor]) -> int:
    """Learned numbers of a stored subspace task: d, plus L split logits for ``learned`` (not the seed)."""
    return sum(v.numel() for k, v in stored.items() if k != "subspace.seed")


def _even_split(d: int, parts: int) -> list[int]:
    """d coordinates over ``parts`` blocks, as even as possible (the first d % parts get one more)."""
    return [d // parts + (1 if i < d % parts else 0) for i in range(parts)]


class SubspaceAdapter(nn.Module):
    """The factors of one task's adapter in every block, as theta_0 + P z (``allocation_mode``):

    - ``uniform``: one projection over all A and B parameters, from all of z;
    - ``fixed``: z[:d_A] feeds A and z[d_A:] feeds B, d_B = round(ratio d), through separate projections;
    - ``learned``: z split evenly over the L blocks; in block l, gamma_l = sigmoid(split_l) (split_l
      starts at 0) and the soft mask m_j = sigmoid(C (gamma_l d_l - j)) sends z m to B and z (1 - m)
      to A, both through that block's own projections.
    """

    def __init__(self, shapes: Sequence[tuple[torch.Size, torch.Size]], spec: SubspaceSpec,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        if spec.mode not in MODES:
            raise ValueError(f"unknown allocation_mode '{spec.mode}'; use one of {MODES}")
        self.spec, self.shapes = spec, [(torch.Size(a), torch.Size(b)) for a, b in shapes]
        L, d = len(self.shapes), spec.dim
        n_a = [a.numel() for a, _ in self.shapes]
        n_b = [b.numel() for _, b in self.shapes]
        if d > sum(n_a) + sum(n_b):
            raise ValueError(f"intrinsic_dim {d} exceeds the {sum(n_a) + sum(n_b):,} LoRA parameters it would "
                             "parametrise; lower it, or set it to null for plain LoRA")
        g = torch.Generator().manual_seed(spec.seed)
        # theta_0: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming-uniform, a = sqrt(5), as plain LoRA), B = 0
        self.register_buffer("A0", torch.cat([
            torch.rand(a.numel(), generator=g, dtype=torch.float64).mul(2).sub(1).div(math.sqrt(a[-1]))
            for a, _ in self.shapes]).to(device=device, dtype=dtype), persistent=False)
        lo_a, hi_a, lo_b, hi_b = self._ranges(n_a, n_b)
        self.proj_A = SparseProjection(lo_a, hi_a, g).to(device, dtype)
        self.proj_B = SparseProjection(lo_b, hi_b, g).to(device, dtype)
        self.z = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.split = nn.Parameter(torch.zeros(L, device=device, dtype=dtype)) if spec.mode == "learned" else None
        if spec.mode == "learned":
            sizes = _even_split(d, L)
            self.register_buffer("block_of", torch.repeat_interleave(
                torch.arange(L), torch.tensor(sizes)).to(device), persistent=False)
            self.register_buffer("block_size", torch.tensor(sizes, dtype=dtype, device=device), persistent=False)
            self.register_buffer("pos", torch.cat([torch.arange(s) for s in sizes]).to(device=device, dtype=dtype),
                                 persistent=False)

    def _ranges(self, n_a: list[int], n_b: list[int]):
        """Per-row column ranges [lo, hi) of P_A and P_B for the mode."""
        d, L = self.spec.dim, len(n_a)
        full = lambda n, lo, hi: (torch.full((n,), lo), torch.full((n,), hi))  # noqa: E731
        if self.spec.mode == "uniform":
            return (*full(sum(n_a), 0, d), *full(sum(n_b), 0, d))
        if self.spec.mode == "fixed":
            d_b = self.b_dims()
            return (*full(sum(n_a), 0, d - d_b), *full(sum(n_b), d - d_b, d))
        sizes = _even_split(d, L)
        if min(sizes) < 1:
            raise ValueError(f"allocation_mode 'learned' splits intrinsic_dim {d} over {L} blocks: it must be >= {L}")
        starts = [sum(sizes[:i]) for i in range(L)]
        cat = lambda ns: [torch.cat(t) for t in zip(*(full(n, s, s + k) for n, s, k in zip(ns, starts, sizes)))]  # noqa: E731
        return (*cat(n_a), *cat(n_b))

    def b_dims(self) -> int:
        """fixed: d_B = round(ratio d), kept in [1, d - 1] (the config checks that the rounding allows it)."""
        return int(round(self.spec.ratio * self.spec.dim))

    def mask(self) -> Optional[torch.Tensor]:
        """learned: the soft mask m (d,), the share of each coordinate that goes to B."""
        if self.split is None:
            return None
        gamma = torch.sigmoid(self.split)
        return torch.sigmoid(MASK_STEEPNESS * (gamma[self.block_of] * self.block_size[self.block_of] - self.pos))

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of every block, shaped as the block's adapter: theta_0 + P z."""
        m = self.mask()
        z_a, z_b = (self.z, self.z) if m is None else (self.z * (1 - m), self.z * m)
        a_flat = self.A0 + self.proj_A(z_a)
        b_flat = self.proj_B(z_b)
        out, ia, ib = [], 0, 0
        for sa, sb in self.shapes:
            out.append((a_flat[ia:ia + sa.numel()].view(sa), b_flat[ib:ib + sb.numel()].view(sb)))
            ia, ib = ia + sa.numel(), ib + sb.numel()
        return out

    def stored(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the task: z, the seed, and the split logits for ``learned``."""
        t = {"subspace.z": self.z.detach(), "subspace.seed": torch.tensor(self.spec.seed, dtype=torch.long)}
        if self.split is not None:
            t["subspace.split"] = self.split.detach()
        return t

    def n_stored(self) -> int:
        return stored_numbers(self.stored())

    def load_stored(self, t: dict[str, torch.Tensor]) -> None:
        if int(t["subspace.seed"]) != self.spec.seed or t["subspace.z"].shape != self.z.shape:
            raise KeyError("subspace.seed / subspace.z do not match the config's intrinsic_dim and seed")
        with torch.no_grad():
            self.z.copy_(t["subspace.z"])
            if self.split is not None:
                self.split.copy_(t["subspace.split"])
