"""RanPAC (McDonnell et al., NeurIPS 2023): no training; the frozen backbone's features f go through a fixed
random projection and a ReLU, h = relu(f W), W (d x M) ~ N(0, 1) drawn from the run's seed, and a ridge
classifier over the statistics of every image seen so far, G = sum h h^T (M x M) and Q = sum h y^T, gives the
logits h W_o with W_o = (G + lambda I)^-1 Q. Lambda is chosen per task as the paper's code does: on the task's
own images, shuffled, fitted on the first 80 % and scored (mean squared error) on the last 20 %, over
10^-8 .. 10^8; the fit is solved in its n x n dual form (the same solution, Woodbury), so only the final
solve is M x M.

Memory: G is M^2 float64 numbers (800 MB at M = 10,000), kept on the device under CUDA when it takes under a
quarter of the free memory, else on the CPU; resume keeps G and Q of the last two tasks
(``ranpac_state.safetensors`` and ``ranpac_state.prev.safetensors``), so a RanPAC run resumes but does not fork.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from backbone.head import GrowingHead
from models import register
from models.base import task_seed
from models.simplecil import PrototypeKeys, SimpleCIL, check_adapt_keys
from utils.config import _positive
from utils.config.schema import _key
from utils import dist
from utils.io import CheckpointError, atomic_write

log = logging.getLogger("cl")

RIDGES = 10.0 ** np.arange(-8, 9)
STATE, PREV = "ranpac_state.safetensors", "ranpac_state.prev.safetensors"


@dataclasses.dataclass
class RanPACKeys(PrototypeKeys):
    """RanPAC's own config keys (first_session_adapt: as SimpleCIL's)."""
    ranpac_dim: int = _key(10000, "M, the random projection's width (the paper's default 10,000); G is M x M",
                           check=_positive)


class ProjectionHead(GrowingHead):
    """logits = relu(x W_rand) W_o^T: the fixed random projection (a buffer) and the ridge classifier's rows."""

    def __init__(self, in_features: int, dim: int, seed: int):
        super().__init__(dim)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W_rand", torch.randn(in_features, dim, generator=g))

    def expand(self, n: int) -> None:
        """n zero rows: a class has no weight until the ridge solve gives it one."""
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), self.weight.new_zeros(n, self.in_features)]),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), self.bias.new_zeros(n)]), requires_grad=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_rand.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.project(x), self.weight)


def accumulate(G: torch.Tensor, Q: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
    """G += h^T h and Q += h^T onehot(y) (in place; y indexes Q's columns)."""
    h = h.to(G.dtype)
    G.addmm_(h.t(), h)
    Q.index_add_(1, y, h.t())


def choose_ridge(h: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[float, list[float]]:
    """The ridge of the lowest validation error: fit on the first 80 % of (h, y), score on the rest. The fit is
    W = H^T (H H^T + l I)^-1 Y, the dual form of (H^T H + l I)^-1 H^T Y (equal; tested)."""
    h = h.double()
    Y = nn.functional.one_hot(y, n_classes).double()
    n = int(h.shape[0] * 0.8)
    K, cross = h[:n] @ h[:n].t(), h[n:] @ h[:n].t()  # (n, n) and (N - n, n)
    s, U = torch.linalg.eigh(K)
    UtY, cU = U.t() @ Y[:n], cross @ U
    losses = [float(((cU @ (UtY / (s.clamp_min(0) + lam)[:, None]) - Y[n:]) ** 2).mean()) for lam in RIDGES]
    return float(RIDGES[int(np.argmin(losses))]), losses


def _task_of(path: Path) -> str | None:
    """The task a saved G, Q belong to (the file's metadata)."""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("task")


def solve(G: torch.Tensor, Q: torch.Tensor, ridge: float) -> torch.Tensor:
    """W_o^T = ((G + ridge I)^-1 Q)^T, (classes, M)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, Q).t()


@register("ranpac", keys=RanPACKeys, uses=("lora_rank", "lora_targets"), check=check_adapt_keys)
class RanPAC(SimpleCIL):
    """SimpleCIL's data path (the task's training images, test transform, no adapter), RanPAC's classifier."""

    forkable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        M = self.cfg.ranpac_dim
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        self.state_device = self.device if 8 * M * M < free / 4 else torch.device("cpu")
        self.G = torch.zeros(M, M, dtype=torch.float64, device=self.state_device)
        self.Q = torch.zeros(M, 0, dtype=torch.float64, device=self.state_device)
        log.info(f"RanPAC: M = {M}, G holds {8 * M * M / 2**20:,.0f} MB (float64) on {self.state_device}")

    def make_head(self, n_features: int) -> ProjectionHead:
        return ProjectionHead(n_features, self.cfg.ranpac_dim, self.seed)

    @torch.no_grad()
    def set_classifier(self, task: int, loader: DataLoader) -> None:
        """G and Q take the task's images; the ridge is chosen on them; the classifier is solved again."""
        hi = self.net.head.out_features
        lo = hi - self.n_new
        f, y = self.features(loader)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(task_seed(self.seed, task)))
        h = self.net.head.project(f[order.to(f.device)]).to(self.state_device)
        y = y[order.to(y.device)].to(self.state_device)
        self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], hi - self.Q.shape[1])], 1)
        accumulate(self.G, self.Q, h, y)
        ridge, _ = choose_ridge(h, y - lo, hi - lo)
        log.info(f"RanPAC task {task}: ridge {ridge:g} (validation on 20 % of the task's images)")
        self.metrics.setdefault("ridge", []).append(ridge)
        self.net.head.weight.copy_(solve(self.G, self.Q, ridge).to(self.net.head.weight))

    # ---- G and Q for resume: the last two tasks' ------------------------------------------------------
    def save_task(self, task: int) -> None:
        """G and Q after this task in STATE, the previous task's moved to PREV (one left by a crash of this very
        task is overwritten, so PREV stays the task before)."""
        path, prev = self.run_dir / STATE, self.run_dir / PREV
        if dist.is_main() and path.is_file() and _task_of(path) != str(task):
            os.replace(path, prev)
        tensors = {"G": self.G.cpu(), "Q": self.Q.cpu()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"task": str(task)}))
        super().save_task(task)

    def checkpoint_tensors(self, task: int) -> dict[str, torch.Tensor]:
        """The head's rows, and on task 0 the random projection (fixed by the seed, saved once)."""
        t = super().checkpoint_tensors(task)
        if task == 0:
            t["ranpac.W_rand"] = self.net.head.W_rand
        return t

    def restore(self, dm, done: int) -> None:
        super().restore(dm, done)
        for p in (self.run_dir / STATE, self.run_dir / PREV):
            if p.is_file() and _task_of(p) == str(done):
                state = load_file(str(p))
                self.G, self.Q = state["G"].to(self.state_device), state["Q"].to(self.state_device)
                self._check_projection()
                return
        raise CheckpointError(f"{self.run_dir}: no RanPAC statistics (G, Q) after task {done} in {STATE} or {PREV}")

    def _check_projection(self) -> None:
        saved = load_file(str(self.run_dir / "task_0.safetensors")).get("ranpac.W_rand")
        if saved is None or not torch.equal(saved, self.net.head.W_rand.cpu()):
            raise CheckpointError(f"{Path(self.run_dir) / 'task_0.safetensors'}: its random projection is not the one "
                                  "the run's seed draws")
