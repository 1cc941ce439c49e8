"""How well the features at hand separate each task's classes, plain and shifted: the data behind a need signal.

    python benchmarks/need_probe.py RUN_DIR [--kinds grey_invert rot180 patch_shuffle] [--tasks 1 2 3]
    python benchmarks/need_probe.py RUN_DIR --novelty [--blocks 1 5 11]

For every task t >= 1 of a finished run, the network is rebuilt as it stood after task t-1 (its checkpoints), and
task t's training images (test transform) go through its backbone, as they are and shown as each shift kind
would show them. Two training-free probes of those features: the leave-one-out accuracy of the nearest class
mean (cosine) and of a ridge classifier on one-hot targets (closed form, PRESS residuals). The same for the
pretrained backbone without any adapter. A need signal that grows at the shifted tasks must separate the
shifted columns from the plain ones at every t, across the spread of the plain column over t.

``--novelty``: the signal of growth on novelty (models/novelty_growth.py) at several blocks of the pretrained
backbone: task t's mean token, plain or shown as each shift kind, against the plain tasks 0..t-1 (their mean
token and spread), in units of that spread. It needs only the run's config (data, protocol, seed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import get_learner  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.run_folder import read_config  # noqa: E402
from utils.data.data_manager import DataManager, TaskDataset  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402


def ncm_loo_accuracy(f: torch.Tensor, y: torch.Tensor) -> float:
    """Leave-one-out nearest-class-mean accuracy, cosine similarity to each class's mean without the image itself."""
    f = F.normalize(f.double(), dim=1)
    classes = y.unique()
    sums = torch.stack([f[y == c].sum(0) for c in classes])
    counts = torch.tensor([int((y == c).sum()) for c in classes], dtype=torch.float64)
    own = (y[:, None] == classes[None, :])
    means = (sums[None] - own[..., None] * f[:, None]) / (counts[None, :, None] - own[..., None].double())
    sim = (F.normalize(means, dim=2) * f[:, None]).sum(2)
    return float((classes[sim.argmax(1)] == y).double().mean())


def ridge_loo_accuracy(f: torch.Tensor, y: torch.Tensor, ridge: float = 1.0) -> float:
    """Leave-one-out accuracy of ridge regression on one-hot targets (centred, standardised features), from the
    hat matrix: the prediction without image i is (yhat_i - h_ii y_i) / (1 - h_ii)."""
    x = f.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    classes = y.unique()
    t = (y[:, None] == classes[None, :]).double()
    k = x @ x.T
    hat = k @ torch.linalg.solve(k + ridge * x.shape[1] * torch.eye(len(x), dtype=x.dtype),
                                 torch.eye(len(x), dtype=x.dtype))
    pred = hat @ t
    h = hat.diagonal()[:, None]
    loo = (pred - h * t) / (1 - h)
    return float((classes[loo.argmax(1)] == y).double().mean())


@torch.no_grad()
def features(learner, ds: TaskDataset) -> tuple[torch.Tensor, torch.Tensor]:
    learner.net.eval()
    loader = learner.loader(ds, train=False, task=0)
    fs, ys = [], []
    for x, y in loader:
        fs.append(learner.net.backbone(x.to(learner.device)).float().cpu())
        ys.append(y)
    return torch.cat(fs), torch.cat(ys)


def shown_as(ds: TaskDataset, kind: str | None) -> TaskDataset:
    """The same images, plain (kind None) or every one shifted by ``kind``."""
    import numpy as np
    flags = None if kind is None else np.ones(len(ds), bool)
    return TaskDataset(ds.images, ds.labels, ds.transform, shifted=flags, shift_kind=kind or "grey_invert")


@torch.no_grad()
def token_stats(learner, ds: TaskDataset, blocks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per block: the mean and variance over the images of each token position's features (no adapter)."""
    vit, out = learner.net.backbone.vit, {b: [] for b in blocks}
    hooks = [vit.blocks[b].register_forward_hook(lambda m, i, o, b=b: out[b].append(o.double())) for b in blocks]
    learner.net.eval()
    with learner.net.backbone.pretrained_only():
        for x, _ in learner.loader(ds, train=False, task=0):
            vit(x.to(learner.device))
    for h in hooks:
        h.remove()
    return {b: (torch.cat(v).mean(0), torch.cat(v).var(0)) for b, v in out.items()}


def novelty_table(learner, dm: DataManager, kinds: list[str], blocks: list[int]) -> list[dict]:
    from models.novelty_growth import novelty_from
    cols = [None] + kinds
    stats = {(t, k): token_stats(learner, shown_as(dm.train_set(t, learner.test_tf), k), blocks)
             for t in range(dm.n_tasks) for k in cols}
    rows = []
    print("task | " + " | ".join(f"{k or 'plain'}: blocks {' / '.join(map(str, blocks))}" for k in cols))
    for t in range(1, dm.n_tasks):
        row = {"task": t}
        for k in cols:
            row[k or "plain"] = [novelty_from(stats[(t, k)][b][0], [stats[(s, None)][b] for s in range(t)])
                                 for b in blocks]
        rows.append(row)
        print(f"{t} | " + " | ".join(" / ".join(f"{v:.4f}" for v in row[k or "plain"]) for k in cols), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--kinds", nargs="*", default=["grey_invert", "rot180", "patch_shuffle"])
    ap.add_argument("--tasks", nargs="*", type=int)
    ap.add_argument("--json", type=Path, help="write the rows here as well")
    ap.add_argument("--novelty", action="store_true", help="the novelty signal by block instead of the probes")
    ap.add_argument("--blocks", nargs="*", type=int, default=[1, 5, 11])
    args = ap.parse_args(argv)
    raw = read_config(args.run_dir, "RUN_DIR")
    cfg = build_config(dict(raw, shift_tasks=[], log_dir=str(args.run_dir.parent)))
    seed = cfg.seeds[0]
    dm = DataManager.for_config(cfg, load_dataset(cfg), seed)
    done = len(json.loads((args.run_dir / "metrics.json").read_text())["A"])
    tasks = args.tasks or list(range(1, done))
    cls = get_learner(cfg.model_name)
    pretrained = cls(cfg, torch.device("cpu"), args.run_dir, seed)  # no adapter added: the backbone as loaded
    if args.novelty:
        rows = novelty_table(pretrained, dm, args.kinds, args.blocks)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    cols = [None] + args.kinds
    rows = []
    print("task | " + " | ".join(f"{k or 'plain'} ncm/ridge (at hand)" for k in cols) + " | "
          + " | ".join(f"{k or 'plain'} ncm/ridge (pretrained)" for k in cols))
    for t in tasks:
        at_hand = cls(cfg, torch.device("cpu"), args.run_dir, seed)
        at_hand.restore(dm, t - 1)
        ds = dm.train_set(t, at_hand.test_tf)
        row = {"task": t}
        for who, lr in (("at_hand", at_hand), ("pretrained", pretrained)):
            for kind in cols:
                f, y = features(lr, shown_as(ds, kind))
                row[f"{who}_{kind or 'plain'}"] = (ncm_loo_accuracy(f, y), ridge_loo_accuracy(f, y))
        rows.append(row)
        print(f"{t} | " + " | ".join(f"{row[k][0]:.3f}/{row[k][1]:.3f}" for k in row if k != "task"), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
