"""InfLoRA (Liang and Li, CVPR 2024): each task's LoRA trains only B, in a subspace the earlier tasks' inputs
do not use.

Per task t and adapted layer (the k and v slices of every block's qkv, as in the public code):
1. before training, C_t = mean over the task's training tokens of x x^T (x: the layer's input);
   A_t = the top ``lora_rank`` left singular vectors of C_t (task 0) or of C_t projected away from the
   stored subspace M (``(I - M M^T) C_t``, or ``M M^T C_t`` where M stores the free complement), divided by
   sqrt(3); the same A_t for k and v;
2. B_t (zeros) and the task's head rows train, A_t stays fixed, with the current task's logits only;
3. after training, C_t again (the trained network) updates M by DualGPM with the threshold
   lamb + (lame - lamb) t / T (T = number of tasks);
4. B_t A_t is merged into the frozen qkv weight: the next task starts from W + sum_j B_j A_j and the
   forward pass holds one adapter, whatever the task.

Since A_t x = 0 for x in the stored subspace, B_t leaves the outputs on earlier tasks' input subspace as they
were (tested). M is kept in float64; the public code's numpy SVDs run in float32. After the first task the
public code stores a basis of more than d / 2 columns as "retain" without taking its complement (a path its own
check after the update would reject); here every basis over d / 2 becomes its complement, as that check asks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch

from backbone.gate import IsolatedGate
from models import register
from models.base import Learner, log
from utils.config import _key
from utils import dist
from utils.data.data_manager import DataManager


def _unit(v: float) -> Optional[str]:
    return None if 0 < v <= 1 else "must be in (0, 1]"


@dataclasses.dataclass
class InfLoRAKeys:
    """InfLoRA's own config keys (names of the public code)."""
    lamb: float = _key(0.95, "DualGPM threshold after the first task: the share of the input energy the stored "
                       "subspace keeps", check=_unit)
    lame: float = _key(1.0, "DualGPM threshold reached at the last task (linear from lamb)", check=_unit)
    inflora_energy: Literal["squared", "plain"] = _key(
        "squared", "what DualGPM's threshold counts: 'squared' singular values of the input covariance (the public "
        "code) or 'plain' ones, its eigenvalues: the share of the inputs' own energy")
    inflora_centre: bool = _key(False, "subtract the tokens' mean before the covariance of A_t and DualGPM (the "
                                "public code does not)")
    inflora_a_scale: float = _key(1 / math.sqrt(3), "A_t = this x the top singular vectors (public code: 1/sqrt(3))",
                                  check=lambda v: None if v > 0 else "must be > 0")


def _check(cfg, raw: dict) -> list[str]:
    errs = []
    if cfg.lamb > cfg.lame:
        errs.append(f"config key 'lamb' = {cfg.lamb} must be <= 'lame' = {cfg.lame}")
    if cfg.intrinsic_dim is not None:
        errs.append("config key 'intrinsic_dim' (SubLoRA) does not apply to inflora; remove it")
    return errs


def projected_basis(cov: torch.Tensor, memory: Optional[torch.Tensor], retain: bool, rank: int,
                    scale: float = 1 / math.sqrt(3)) -> torch.Tensor:
    """The rank x d down-projection of a task: top singular vectors of its input covariance, outside the
    stored subspace, times ``scale`` (public code: 1 / sqrt(3))."""
    if memory is not None:
        proj = memory @ memory.T
        cov = proj @ cov if retain else cov - proj @ cov
    u = torch.linalg.svd(cov, full_matrices=False)[0]
    return u[:, :rank].T * scale


def _outside(cov: torch.Tensor, memory: torch.Tensor, retain: bool, plain: bool) -> torch.Tensor:
    """The covariance seen in the space DualGPM may still fill: P C (public code) or, for the plain spectrum,
    P C P, whose eigenvalues sum to the energy there (P projects on the free space)."""
    proj = memory @ memory.T
    if not plain:
        return proj @ cov if retain else cov - proj @ cov
    if not retain:
        proj = torch.eye(cov.shape[0], dtype=cov.dtype) - proj
    return proj @ cov @ proj


def update_memory(cov: torch.Tensor, memory: Optional[torch.Tensor], retain: bool,
                  threshold: float, plain: bool = False) -> tuple[torch.Tensor, bool]:
    """DualGPM: grow the stored basis of the input space (or shrink the stored free complement) until it keeps
    ``threshold`` of the task's input energy, counted as squared singular values (public code) or, ``plain``,
    as the covariance's eigenvalues; a basis over half of d is stored as its complement."""
    d = cov.shape[0]
    energy = (lambda s: s) if plain else (lambda s: s ** 2)
    if memory is None:
        u, s, _ = torch.linalg.svd(cov, full_matrices=False)
        ratio = energy(s) / energy(s).sum()
        r = int((torch.cumsum(ratio, 0) < threshold).sum())
        memory, retain = u[:, :max(r, 1)], False
    else:
        total = energy(torch.linalg.svd(cov, full_matrices=False)[1]).sum()
        u, s, _ = torch.linalg.svd(_outside(cov, memory, retain, plain), full_matrices=False)
        ratio = energy(s) / total
        kept = energy(s).sum() / total if retain else (total - energy(s).sum()) / total
        r = 0
        for q in ratio.tolist():
            if (kept >= 1 - threshold) if retain else (kept < threshold):
                kept = kept - q if retain else kept + q
                r += 1
            else:
                break
        if r and not retain:
            memory = torch.cat([memory, u[:, :r]], 1)[:, :d]
        elif r:
            rest = memory - u[:, :r] @ (u[:, :r].T @ memory)
            memory = torch.linalg.svd(rest)[0][:, :memory.shape[1] - r]
    if not retain and memory.shape[1] > d / 2:
        memory, retain = torch.linalg.svd(memory)[0][:, memory.shape[1]:], True
    return memory, retain


@register("inflora", keys=InfLoRAKeys, uses=("lora_rank", "lora_targets"), check=_check)
class InfLoRA(Learner):
    """One adapter per task (w = 1, alone in the forward pass), B only; finished adapters merged into W."""

    default_alpha = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = len(self.net.backbone.layers)
        self.memory: list[Optional[torch.Tensor]] = [None] * n  # per layer: d x k basis (float64, CPU)
        self.retain: list[bool] = [False] * n  # True: memory holds the free complement, not the used space
        self.n_tasks = 0

    def make_gate(self, n_layers: int) -> IsolatedGate:
        return IsolatedGate(n_layers)

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        self.net.backbone.add_task(task, self.rank(task), 1.0)
        for layer in self.net.backbone.layers:
            layer.lora_A[str(task)].requires_grad_(False)  # A is fixed from the inputs; only B trains
        self.net.to(self.device)

    @torch.no_grad()
    def input_covariance(self, loader) -> list[torch.Tensor]:
        """Per adapted layer, the mean of x x^T over every token of the loader's images (float64, CPU); minus
        the mean's outer product with ``inflora_centre``."""
        sums = [torch.zeros(layer.dim, layer.dim, dtype=torch.float64, device=self.device)
                for layer in self.net.backbone.layers]
        firsts = [torch.zeros(layer.dim, dtype=torch.float64, device=self.device)
                  for layer in self.net.backbone.layers]
        count = [0]

        def hook(i):
            def fn(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[i].add_((x.T @ x).double())
                firsts[i].add_(x.sum(0).double())
                if i == 0:
                    count[0] += x.shape[0]
            return fn
        handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(self.net.backbone.layers)]
        self.net.eval()
        try:
            for x, _ in loader:
                with self._autocast():
                    self.net.backbone(x.to(self.device, non_blocking=True))
        finally:
            for h in handles:
                h.remove()
        total = dist.all_sum(torch.tensor(float(count[0]), dtype=torch.float64, device=self.device)).clamp(min=1)
        covs = []
        for s, f in zip(sums, firsts):  # over every torchrun process
            cov = dist.all_sum(s) / total
            if self.cfg.inflora_centre:
                mean = dist.all_sum(f) / total
                cov = cov - torch.outer(mean, mean)
            covs.append(cov.cpu())
        return covs

    def train_task(self, task: int, loader) -> None:
        cov = self.input_covariance(loader)
        with torch.no_grad():
            for i, layer in enumerate(self.net.backbone.layers):
                A = projected_basis(cov[i], self.memory[i], self.retain[i], layer.lora_A[str(task)].shape[1],
                                    self.cfg.inflora_a_scale)
                layer.lora_A[str(task)].copy_(A.to(layer.lora_A[str(task)].dtype)[None].expand_as(
                    layer.lora_A[str(task)]))
        super().train_task(task, loader)
        cov = self.input_covariance(loader)
        threshold = (self.cfg.lame - self.cfg.lamb) * task / self.n_tasks + self.cfg.lamb
        for i, c in enumerate(cov):
            self.memory[i], self.retain[i] = update_memory(c, self.memory[i], self.retain[i], threshold,
                                                           plain=self.cfg.inflora_energy == "plain")
        kept = [m.shape[1] if not r else m.shape[0] - m.shape[1] for m, r in zip(self.memory, self.retain)]
        log.info(f"InfLoRA memory after task {task} (threshold {threshold:.4f}): input subspace dims per block "
                 f"{kept} of {self.memory[0].shape[0]}")

    def end_task(self, task: int) -> None:
        """B_t A_t joins the frozen qkv weight; the forward pass keeps no adapter of this task."""
        self.merge_adapter(task)
        self.net.backbone.freeze_current()  # no current adapter: IsolatedGate leaves none in the forward pass

    @torch.no_grad()
    def merge_adapter(self, task: int) -> None:
        for layer in self.net.backbone.layers:
            layer.fold_into_base(task)

    def memory_numbers(self) -> int:
        """Numbers the method stores besides the adapters: the DualGPM bases of every block."""
        return sum(m.numel() for m in self.memory if m is not None)

    def record_extra(self, task: int) -> None:
        self.metrics.setdefault("memory_numbers", []).append(self.memory_numbers())

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"inflora.memory.{i}": m.contiguous() for i, m in enumerate(self.memory) if m is not None}
        t["inflora.retain"] = torch.tensor(self.retain, dtype=torch.int8)
        return t

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory = [tensors.get(f"inflora.memory.{i}") for i in range(len(self.memory))]
        self.retain = [bool(r) for r in tensors["inflora.retain"].tolist()]

    def run(self, dm: DataManager, start: int = 0) -> dict:
        self.n_tasks = dm.n_tasks
        return super().run(dm, start)

    def restore(self, dm: DataManager, done: int) -> None:
        """The saved adapters, merged into W again in the order training merged them (bit for bit)."""
        self.n_tasks = dm.n_tasks
        super().restore(dm, done)
        for task in range(done + 1):
            self.merge_adapter(task)
        self.net.backbone.configure()
