"""Classifier heads from feature statistics: the one mechanism every learner takes through the ``head`` key.

``"linear"`` is the learner's own SGD-trained head and needs nothing here. The others keep statistics of each
class's features, taken right after the class's task through the backbone of that time (no image is kept), and
classify from them:

- ``"ncm"``: nearest class mean by cosine (SimpleCIL; LoRA-, EASE).
- ``"ridge"``: RanPAC's ridge classifier over h = relu(f W_rand): G = sum h h^T, Q = sum h y^T, W_o = (G + l I)^-1 Q,
  the ridge l chosen on each task's own images (McDonnell et al., 2023), or the same at every task (``ranpac_ridge``).
- ``"aligned"``: classifier alignment (SLCA, MOS): after each task the linear head is trained again on samples
  drawn from every class's Gaussian N(mu_c, Sigma_c).

Old classes' statistics were taken through older backbones; ``drift_compensation`` moves them towards the
current one without old images, from the drift the current task's images show between the backbone before the
task and after it: ``"sdc"`` shifts each old mean by the Gaussian-weighted mean drift of the nearby images (SDC,
Yu et al. 2020); ``"linear"`` maps means (and covariances) through the least-squares linear map from the old
features to the new ones (LDC, Gomez-Villa et al. 2024).
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import ClassVar, Optional

import numpy as np
import torch
from torch import nn

#: RanPAC's ridge search: 10^-8 .. 10^8.
RIDGES = 10.0 ** np.arange(-8, 9)


# ---- the maths, on feature tensors -------------------------------------------------------------------------------
@torch.no_grad()
def class_means(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """(len(classes), d) mean feature of each class, accumulated in float64."""
    sums = features.new_zeros(len(classes), features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels - classes.start, features.double())
    counts = torch.bincount(labels - classes.start, minlength=len(classes)).clamp_min(1)
    return sums / counts[:, None]


@torch.no_grad()
def class_covariances(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """(len(classes), d, d) unbiased covariance of each class's features (float64), as torch.cov."""
    f = features.double()
    out = f.new_zeros(len(classes), f.shape[1], f.shape[1])
    for i, c in enumerate(classes):
        x = f[labels == c]
        x = x - x.mean(0)
        out[i] = x.t() @ x / max(len(x) - 1, 1)
    return out


def cosine_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """cos(f, mu_c) for every class: the nearest-class-mean classifier's scores."""
    return nn.functional.linear(nn.functional.normalize(features.float(), dim=-1),
                                nn.functional.normalize(means.float(), dim=-1))


def random_projection(in_features: int, dim: int, seed: int) -> torch.Tensor:
    """RanPAC's fixed W_rand (d x M) ~ N(0, 1), drawn from the run's seed."""
    return torch.randn(in_features, dim, generator=torch.Generator().manual_seed(seed))


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


#: The smallest ridge ``solve`` uses, as a fraction of trace(G): below it float64 rounding swamps the solve.
SOLVE_RTOL = 1e-12


def stable_ridge(G: torch.Tensor, ridge: float) -> float:
    """``ridge``, raised to SOLVE_RTOL * trace(G) where it is smaller. G of fewer images than its size M is singular,
    and (G + ridge I)^-1 Q at ridge = 1e-8 against eigenvalues near 1e10 is rounding noise (2.6 % instead of 44.6 %
    on a 50-task stream), where the exact answer is the minimum-norm fit the ridge search scored in dual form;
    above the floor the solve equals that dual fit (to 1e-5 relative) and the accuracy does not move."""
    return max(float(ridge), SOLVE_RTOL * float(G.diagonal().sum()))


def solve(G: torch.Tensor, Q: torch.Tensor, ridge: float) -> torch.Tensor:
    """W_o^T = ((G + ridge I)^-1 Q)^T, (classes, M), with the ridge raised to ``stable_ridge`` where it is smaller.
    By Cholesky (G + ridge I is symmetric positive definite; at M = 10,000 on one CPU thread 10 s against
    18 s for LU), by LU only where rounding leaves it not positive definite (the same solution)."""
    def shifted() -> torch.Tensor:  # G + ridge I without an M x M identity (800 MB more at M = 10,000)
        A = G.clone()
        A.diagonal().add_(stable_ridge(G, ridge))
        return A

    L = shifted().mT  # factorised in place (symmetric, so its column-major view is itself): one copy of G, not two
    info = torch.zeros((), dtype=torch.int32, device=G.device)
    torch.linalg.cholesky_ex(L, out=(L, info))
    return (torch.cholesky_solve(Q, L) if int(info) == 0 else torch.linalg.solve(shifted(), Q)).t()


def gaussian_samples(means: torch.Tensor, covs: torch.Tensor, n: int, generator: torch.Generator,
                     jitter: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of every class's N(mu_c, Sigma_c + jitter I) (float32) and their labels 0..C-1, as SLCA draws
    them (its 1e-4 keeps a covariance of fewer images than dimensions positive definite)."""
    C, d = means.shape
    eye = torch.eye(d, dtype=torch.float64, device=means.device)
    L = torch.linalg.cholesky(covs.double() + jitter * eye)  # (C, d, d)
    z = torch.randn(C, n, d, generator=generator, dtype=torch.float64).to(means.device)
    x = means.double()[:, None, :] + z @ L.transpose(1, 2)
    return x.reshape(C * n, d).float(), torch.arange(C, device=means.device).repeat_interleave(n)


def align(weight: torch.Tensor, bias: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, seed: int, *,
          samples: int = 256, epochs: int = 5, lr: float = 0.01, temperature: float = 0.1,
          task_sizes: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SLCA's classifier alignment: the linear head (weight, bias) trained from where it is on ``samples`` draws of
    every class's Gaussian per epoch, SGD (momentum 0.9, weight decay 5e-4) with a cosine rate over ``epochs``,
    batches of ``samples`` draws, logits divided by each task's logit norm and ``temperature`` (SLCA's logit
    normalisation, so old and new tasks' logits are on one scale). Returns the new (weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    bounds = np.cumsum([0] + list(task_sizes or [weight.shape[0]]))
    C = means.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            x, y = gaussian_samples(means, covs, samples, g)
            order = torch.randperm(len(y), generator=g)
            x, y = x[order], y[order]
            for i in range(C):
                xb, yb = x[i * samples:(i + 1) * samples], y[i * samples:(i + 1) * samples]
                logits = head(xb)
                if temperature:
                    norms = torch.stack([(logits[:, a:b] ** 2).sum(1).add(1e-12).sqrt()
                                         for a, b in zip(bounds, bounds[1:])], 1)
                    logits = logits / (norms.mean(1, keepdim=True) + 1e-7) / temperature
                loss = nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return head.weight.detach().clone(), head.bias.detach().clone()


def sdc_shift(old: torch.Tensor, new: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """SDC's drift of each class mean: the mean of the images' drifts (new - old) weighted by
    exp(-||old_i - mu_c||^2 / (2 s^2)), with s = sigma times the root mean squared distance of the images to the
    means (a scale-free bandwidth). (C, d) float64."""
    old, new, means = old.double(), new.double(), means.double()
    d2 = torch.cdist(means, old) ** 2  # (C, N)
    s2 = (sigma ** 2) * d2.mean()
    logw = -d2 / (2 * s2)
    w = torch.softmax(logw, dim=1)  # the weights normalised per class (a softmax keeps far classes finite)
    return w @ (new - old)


def linear_drift_map(old: torch.Tensor, new: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares affine map new ~ old P + b over the task's images (ridge ``ridge`` times the mean
    eigenvalue, so it is defined with fewer images than dimensions). Returns (P (d, d), b (d,)), float64."""
    old, new = old.double(), new.double()
    mo, mn = old.mean(0), new.mean(0)
    X, Y = old - mo, new - mn
    A = X.t() @ X
    A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    P = torch.linalg.solve(A, X.t() @ Y)
    return P, mn - mo @ P


# ---- the heads -------------------------------------------------------------------------------------------------
class StatsHead:
    """Per-class statistics taken after each task, and logits computed from them. Every head keeps each class's
    mean and count; a subclass says what else it keeps (``keeps_cov``, ``take``), how it fits (``refit``) and how
    it classifies (``logits``)."""

    name: ClassVar[str] = ""
    keeps_cov: ClassVar[bool] = False  # per-class covariances (aligned; and for drift maps of them)

    def __init__(self, n_features: int, seed: int, device: torch.device, cfg=None):
        self.d, self.seed, self.device, self.cfg = n_features, seed, device, cfg
        self.means = torch.zeros(0, n_features, dtype=torch.float64, device=device)
        self.covs = torch.zeros(0, n_features, n_features, dtype=torch.float64, device=device)
        self.counts = torch.zeros(0, dtype=torch.float64, device=device)
        self.task_sizes: list[int] = []
        self.ridges: list[float] = []

    @property
    def n_classes(self) -> int:
        return self.means.shape[0]

    # -- taking a task's classes --
    @torch.no_grad()
    def observe(self, task: int, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        """The task's classes' statistics from their training images' features (through the backbone as it is
        now), then the classifier fitted again."""
        if classes.start != self.n_classes:
            raise ValueError(f"classes arrive in order: expected {self.n_classes}, got {classes.start}")
        f = features.to(self.device)
        y = labels.to(self.device)
        self.means = torch.cat([self.means, class_means(f, y, classes)])
        counts = torch.bincount(y - classes.start, minlength=len(classes)).double()
        self.counts = torch.cat([self.counts, counts])
        if self.keeps_cov:
            self.covs = torch.cat([self.covs, class_covariances(f, y, classes)])
        self.task_sizes.append(len(classes))
        self.take(task, f, y, classes)
        self.refit(task)

    def take(self, task: int, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        """What a head keeps of the task's images besides means and covariances (ridge: G and Q)."""

    def refit(self, task: int) -> None:
        """Fit the classifier again from the statistics."""

    @torch.no_grad()
    def compensate(self, kind: str, old: torch.Tensor, new: torch.Tensor, sigma: float) -> dict:
        """Move the classes known so far by the drift the images (old -> new backbone) show. Returns a record."""
        if not self.n_classes or kind == "none":
            return {}
        old, new = old.to(self.device), new.to(self.device)
        before = self.means.clone()
        if kind == "sdc":
            self.means = self.means + sdc_shift(old, new, self.means, sigma)
        elif kind == "linear":
            P, b = linear_drift_map(old, new)
            self.means = self.means @ P + b
            self.map_second_moments(P)
        else:
            raise ValueError(f"unknown drift compensation '{kind}'")
        moved = (self.means - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)
        return {"mean_relative_shift": float(moved.mean())}

    def map_second_moments(self, P: torch.Tensor) -> None:
        """Second moments under the linear drift map f -> f P (+ b): Sigma -> P^T Sigma P."""
        if self.keeps_cov:
            self.covs = P.t() @ self.covs @ P

    # -- classifying --
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- saving --
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"means": self.means, "counts": self.counts,
             "task_sizes": torch.tensor(self.task_sizes, dtype=torch.long),
             "ridges": torch.tensor(self.ridges, dtype=torch.float64)}
        if self.keeps_cov:
            t["covs"] = self.covs
        return t

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        self.means, self.counts = t["means"].to(self.device), t["counts"].to(self.device)
        self.task_sizes = [int(v) for v in t["task_sizes"]]
        self.ridges = [float(v) for v in t["ridges"]]
        if self.keeps_cov:
            self.covs = t["covs"].to(self.device)

    #: State tensors that are bookkeeping, not statistics of the classes (not counted as stored numbers).
    uncounted: ClassVar[tuple[str, ...]] = ("task_sizes", "ridges")

    def stored_numbers(self) -> int:
        """Numbers the head keeps for its classes (means, covariances, G, Q, ...)."""
        return sum(v.numel() for k, v in self.state_tensors().items() if k not in self.uncounted)


class NCMHead(StatsHead):
    """Nearest class mean by cosine: the means are the classifier."""

    name = "ncm"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features.to(self.device), self.means)


class RidgeHead(StatsHead):
    """RanPAC's ridge classifier over relu(f W_rand), G and Q of every image seen, each through the backbone of
    its task (G is M x M float64: 800 MB at M = 10,000). W_rand is not saved: the seed draws it again."""

    name = "ridge"

    def __init__(self, n_features: int, seed: int, device: torch.device, cfg=None):
        super().__init__(n_features, seed, device, cfg)
        M = cfg.ranpac_dim if cfg is not None else 10000
        # G on the GPU when it takes under a quarter of the free memory, else on the CPU
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.device = device if device.type != "cuda" or 8 * M * M < free / 4 else torch.device("cpu")
        self.W_rand = random_projection(n_features, M, seed).to(self.device)
        self.G = torch.zeros(M, M, dtype=torch.float64, device=self.device)
        self.Q = torch.zeros(M, 0, dtype=torch.float64, device=self.device)
        self.W_o = torch.zeros(0, M, dtype=torch.float32, device=self.device)
        logging.getLogger("cl").info(f"ridge head: M = {M}, G holds {8 * M * M / 2**20:,.0f} MB (float64) on "
                                     f"{self.device}")

    @property
    def fixed_ridge(self) -> Optional[float]:
        """``ranpac_ridge``: the ridge at every task, or None for RanPAC's search on each task's images."""
        fixed = getattr(self.cfg, "ranpac_ridge", None)
        return None if fixed is None else float(fixed)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features.float() @ self.W_rand)

    def take(self, task: int, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        from models.base import task_seed
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(task_seed(self.seed, task)))
        order = order.to(features.device)
        h, y = self.project(features[order]), labels[order]
        self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], classes.stop - self.Q.shape[1])], 1)
        accumulate(self.G, self.Q, h, y)
        fixed = self.fixed_ridge
        self.ridges.append(fixed if fixed is not None else choose_ridge(h, y - classes.start, len(classes))[0])

    def refit(self, task: int) -> None:
        self.W_o = solve(self.G, self.Q, self.ridges[-1]).float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features.to(self.device)) @ self.W_o.t()

    def compensate(self, kind: str, old: torch.Tensor, new: torch.Tensor, sigma: float) -> dict:
        if kind != "none":
            raise ValueError("the ridge head keeps G = sum h h^T, not per-class Gaussians: there is nothing to move")
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(super().state_tensors(), G=self.G, Q=self.Q)

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        super().load_state(t)
        self.G, self.Q = t["G"].to(self.device), t["Q"].to(self.device)
        if self.ridges:
            self.refit(len(self.ridges) - 1)


class FeatureRidgeHead(StatsHead):
    """Ridge regression on one-hot targets over the features themselves, from class statistics alone:
    G = S + sum_c n_c mu_c mu_c^T with S the pooled within-class scatter (d x d), Q = [n_c mu_c], W_o = (G + l I)^-1 Q,
    l chosen on each task's own images as RanPAC chooses it. G is exact from the images, and since it is kept as
    means and one scatter, drift compensation moves it (a mean shift leaves S as it is)."""

    name = "feature_ridge"

    def __init__(self, n_features: int, seed: int, device: torch.device, cfg=None):
        super().__init__(n_features, seed, device, cfg)
        self.scatter = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self.W_o = torch.zeros(0, n_features, dtype=torch.float32, device=device)

    def take(self, task: int, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        from models.base import task_seed
        f = features.double()
        centred = f - self.means[labels]
        self.scatter += centred.t() @ centred
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(task_seed(self.seed, task)))
        order = order.to(features.device)
        self.ridges.append(choose_ridge(f[order], labels[order] - classes.start, len(classes))[0])

    def refit(self, task: int) -> None:
        m, n = self.means, self.counts
        G = self.scatter + (m * n[:, None]).t() @ m
        self.W_o = solve(G, (m * n[:, None]).t(), self.ridges[-1]).float()

    def map_second_moments(self, P: torch.Tensor) -> None:
        self.scatter = P.t() @ self.scatter @ P
        super().map_second_moments(P)

    def compensate(self, kind: str, old: torch.Tensor, new: torch.Tensor, sigma: float) -> dict:
        record = super().compensate(kind, old, new, sigma)
        if record:
            self.refit(len(self.task_sizes) - 1)
        return record

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().to(self.device) @ self.W_o.t()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(super().state_tensors(), scatter=self.scatter)

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        super().load_state(t)
        self.scatter = t["scatter"].to(self.device)
        if self.ridges:
            self.refit(len(self.ridges) - 1)


class AlignedHead(StatsHead):
    """SLCA's classifier alignment: the learner's linear head, trained after each task on samples of every class's
    Gaussian. ``start`` is the linear head the task left (its new rows trained on the task's images)."""

    name = "aligned"
    keeps_cov = True
    uncounted = StatsHead.uncounted + ("weight", "bias")  # the aligned rows replace the learner's own head rows

    def __init__(self, n_features: int, seed: int, device: torch.device, cfg=None):
        super().__init__(n_features, seed, device, cfg)
        self.weight = torch.zeros(0, n_features, device=device)
        self.bias = torch.zeros(0, device=device)
        self.start: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def set_start(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """The linear head as the task's training left it: alignment starts from it."""
        self.start = (weight.detach().float().to(self.device).clone(), bias.detach().float().to(self.device).clone())

    def refit(self, task: int) -> None:
        from models.base import task_seed
        w, b = self.start if self.start is not None else (torch.zeros(self.n_classes, self.d, device=self.device),
                                                          torch.zeros(self.n_classes, device=self.device))
        c = self.cfg
        kw = dict(samples=c.align_samples, epochs=c.align_epochs, lr=c.align_lr,
                  temperature=c.align_temperature) if c is not None else {}
        self.weight, self.bias = align(w, b, self.means, self.covs, task_seed(self.seed, task) + 1,
                                       task_sizes=self.task_sizes, **kw)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features.float().to(self.device), self.weight, self.bias)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(super().state_tensors(), weight=self.weight, bias=self.bias)

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        super().load_state(t)
        self.weight, self.bias = t["weight"].to(self.device), t["bias"].to(self.device)



#: The heads, by the ``head`` key's value ("linear" is the learner's own head: no entry).
HEADS: dict[str, type[StatsHead]] = {h.name: h for h in (NCMHead, RidgeHead, FeatureRidgeHead, AlignedHead)}


def make_head(kind: str, n_features: int, seed: int, device: torch.device, cfg=None) -> Optional[StatsHead]:
    """The statistics head ``kind`` names, or None for the learner's own linear head."""
    return None if kind == "linear" else HEADS[kind](n_features, seed, device, cfg)


class FirstSession:
    """``first_session_head``: a second statistics head over the features of the backbone as task 0 left it, held
    as a copy of its adapter sum (``LoRAViT.snapshot``, one adapter's numbers). Those features never drift, so the
    old classes' statistics stay exact, while ``head`` reads the current backbone, which the later adapters
    improve; the two heads' logits add (APER and EASE join a stable and an adapted backbone the same way)."""

    def __init__(self, kind: str, n_features: int, seed: int, device: torch.device, cfg=None):
        self.head = HEADS[kind](n_features, seed, device, cfg)
        self.view: Optional[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None

    @torch.no_grad()
    def features(self, learner, x: torch.Tensor) -> torch.Tensor:
        """x through the backbone as task 0 left it."""
        backbone = learner.net.backbone
        with backbone.viewing(self.view):
            return backbone(x).float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"first_session.{k}": v for k, v in self.head.state_tensors().items()}
        for i, (A, B, s) in enumerate(self.view or []):
            t.update({f"first_session.view.{i}.A": A, f"first_session.view.{i}.B": B, f"first_session.view.{i}.s": s})
        return t

    def load_state(self, t: dict[str, torch.Tensor], n_layers: int, device: torch.device) -> None:
        """Take back ``state_tensors``; the view goes to the backbone's ``device``."""
        pre = "first_session."
        self.head.load_state({k[len(pre):]: v for k, v in t.items() if k.startswith(pre) and ".view." not in k})
        self.view = [tuple(t[f"{pre}view.{i}.{k}"].to(device) for k in "ABs") for i in range(n_layers)]

    def stored_numbers(self) -> int:
        """The head's statistics and the copy of task 0's adapter sum."""
        return self.head.stored_numbers() + sum(v.numel() for A, B, s in self.view or [] for v in (A, B, s))


def make_first_session(cfg, n_features: int, seed: int, device: torch.device) -> Optional[FirstSession]:
    """The ``first_session_head`` the config names, or None."""
    kind = getattr(cfg, "first_session_head", None)
    return None if kind is None else FirstSession(kind, n_features, seed, device, cfg)


def classify(learner, x: torch.Tensor) -> torch.Tensor:
    """The statistics head's logits for images x, plus the first-session head's (``first_session_head``)."""
    z = learner.classifier.logits(learner.net.backbone(x).float())
    first = learner.first_session
    return z if first is None else z + first.head.logits(first.features(learner, x)).to(z.device)


def stored_numbers(learner) -> int:
    """What the learner's statistics heads keep: the numbers metrics.json reports as head_stored_numbers."""
    first = learner.first_session
    return learner.classifier.stored_numbers() + (0 if first is None else first.stored_numbers())


# ---- a learner's head: taking each task, saving, restoring ----------------------------------------------------
#: The state of the head after task t; the latest two are kept (G alone is 800 MB at M = 10,000).
STATE = "head_task_{}.safetensors"
KEEP = 2


@torch.no_grad()
def task_features(learner, dm, task: int, view=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s training images (test transform, in order) through the learner's backbone as it is now
    (``view``: as a ``LoRAViT.snapshot`` gives it)."""
    learner.net.eval()
    loader = learner.loader(dm.train_set(task, learner.test_tf), train=False, task=task)
    feats, labels = [], []
    backbone = learner.net.backbone
    for x, y in loader:
        with learner._autocast(), (backbone.viewing(view) if view is not None else contextlib.nullcontext()):
            feats.append(backbone(x.to(learner.device, non_blocking=True)).float())
        labels.append(y.to(learner.device))
    return torch.cat(feats), torch.cat(labels)


def features_before(learner, dm, task: int) -> Optional[torch.Tensor]:
    """Before task ``task`` changes the backbone: its images' features, which drift compensation compares with
    the features after it (None when nothing is compensated)."""
    head = learner.classifier
    if head is None or task == 0 or learner.cfg.drift_compensation == "none" or not head.n_classes:
        return None
    return task_features(learner, dm, task)[0]


def take_task(learner, dm, task: int, before: Optional[torch.Tensor]) -> dict:
    """After task ``task``'s training: move the old classes (drift compensation), take the new ones, refit.
    Returns the task's metrics.json entries (``ridge``; ``drift_compensation``, a record with its task)."""
    head, cfg = learner.classifier, learner.cfg
    f, y = task_features(learner, dm, task)
    record = head.compensate(cfg.drift_compensation, before, f, cfg.sdc_sigma) if before is not None else {}
    if isinstance(head, AlignedHead):  # from the linear head as training left it, old rows as aligned before
        w, b = learner.net.head.weight.detach(), learner.net.head.bias.detach()
        if head.n_classes:
            w, b = torch.cat([head.weight, w[head.n_classes:].to(head.device)]), \
                torch.cat([head.bias, b[head.n_classes:].to(head.device)])
        head.set_start(w, b)
    lo, hi = dm.task_range(task)
    head.observe(task, f, y, range(lo, hi))
    first = learner.first_session
    if first is not None:
        if task == 0:  # the backbone as task 0 left it, kept as a copy of its adapter sum
            first.view = learner.net.backbone.snapshot()
        first.head.observe(task, *task_features(learner, dm, task, first.view), range(lo, hi))
    entries = {"drift_compensation": dict(task=task, **record)} if record else {}
    if isinstance(head, RidgeHead):
        entries["ridge"] = head.ridges[-1]
        _log_ridge("ridge head", task, head)
    if first is not None and isinstance(first.head, RidgeHead):
        _log_ridge("first-session ridge head", task, first.head)
    return entries


def _log_ridge(name: str, task: int, head: RidgeHead) -> None:
    """The task's ridge (searched, or ``ranpac_ridge``), and the one the solve used where ``stable_ridge`` raised it."""
    chosen, used = head.ridges[-1], stable_ridge(head.G, head.ridges[-1])
    raised = f", solved with {used:.3g} (stable_ridge: G has fewer images than rows)" if used > chosen else ""
    how = "ranpac_ridge" if head.fixed_ridge is not None else "validation on 20 % of the task's images"
    logging.getLogger("cl").info(f"{name}, task {task}: ridge {chosen:g} ({how}){raised}")


def save_state(learner, task: int) -> None:
    """head_task_{task}.safetensors; older than the latest KEEP removed."""
    from utils import dist
    from utils.io import save_tensors
    run_dir = learner.run_dir
    tensors = learner.classifier.state_tensors()
    if learner.first_session is not None:
        tensors.update(learner.first_session.state_tensors())
    save_tensors(run_dir / STATE.format(task), tensors,
                 metadata={"task": str(task), "head_keys": json.dumps(head_keys(learner.cfg))})
    if dist.is_main():
        for old in range(task - KEEP, -1, -1):
            p = run_dir / STATE.format(old)
            if not p.is_file():
                break
            p.unlink()


def restore_state(learner, dm, done: int) -> None:
    """The head after task ``done``: its saved state, or, where the run folder no longer holds it (a fork at an
    earlier task), rebuilt by replaying the folder's task checkpoints over the tasks' training images."""
    from utils.io import load_tensors
    path = learner.run_dir / STATE.format(done)
    if path.is_file() and _saved_keys(path) == head_keys(learner.cfg):
        tensors = load_tensors(path)
        learner.classifier.load_state(tensors)
        if learner.first_session is not None:
            learner.first_session.load_state(tensors, len(learner.net.backbone.layers), learner.device)
        return
    why = "is not in the run folder" if not path.is_file() else "was taken under other head keys (a fork)"
    logging.getLogger("cl").info(f"{path.name} {why}: the {learner.classifier.name} head is rebuilt from the task "
                                 f"checkpoints 0..{done} (each task's images through its backbone)")
    rebuild(learner, dm, done)


def head_keys(cfg) -> dict:
    """The keys that shape a head's statistics: a saved state is taken back only under the same ones."""
    keys = ("ranpac_dim", "drift_compensation", "sdc_sigma", "align_samples", "align_epochs", "align_lr",
            "align_temperature")
    out = dict({"head": cfg.head_kind}, **{k: getattr(cfg, k) for k in keys})
    if cfg.first_session_head is not None:  # only when set: head states saved before the key still match
        out["first_session_head"] = cfg.first_session_head
    return out


def _saved_keys(path) -> Optional[dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("head_keys", "null"))


def rebuild(learner, dm, done: int) -> None:
    """Take tasks 0..done again as a run took them, each through the backbone its checkpoints give."""
    cls, cfg = type(learner), learner.cfg
    head = learner.classifier
    before = None
    for t in range(done + 1):
        at = cls(cfg, learner.device, learner.run_dir, learner.seed)
        at.classifier, at.first_session = head, learner.first_session
        if t > 0 and cfg.drift_compensation != "none":
            prev = cls(cfg, learner.device, learner.run_dir, learner.seed)
            prev.restore_network(dm, t - 1)
            before = task_features(prev, dm, t)[0]
        at.restore_network(dm, t)
        take_task(at, dm, t, before)
