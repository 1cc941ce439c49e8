"""Training epochs of a real config, end to end, for each data path, beside the model's compute alone.

    python benchmarks/epoch.py --config exps/sdlora_c100.json --task 9 --max_steps 50
    python benchmarks/epoch.py --config exps/demo.json --rounds 3

Takes the same ``--config`` and ``--key value`` overrides as main.py. Builds the method, gives it
``--task`` earlier (frozen, random) adapters, then measures on that task's training data, in
interleaved rounds (the median is printed), all in one process:
  plain     a frozen ViT with no adapter, forward + backward (to its input) + step on one batch already on
            the device and already resized: the floor an epoch can reach
  compute   the method's network, forward + backward + step on one resident batch
  loader    the learner's own epoch with ``augment_on: "loader"`` (DataLoader, torchvision per image)
  device    the learner's own epoch with ``augment_on: "device"`` (uint8 images on the device, one op)
  ... data  each path's batches alone (no model): what the data path costs, as a share of the compute time
and the ratios: each epoch to compute (how much the data path costs) and to plain. On a noisy machine the
epoch ratios move by several per cent between runs; the data-only shares are the robust figure.
"""
from __future__ import annotations

import sys

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from backbone.vit import create_vit
from models import get_learner
from utils.config import load_config, parse_overrides
from utils.data.data_manager import DataManager
from utils.data.datasets import load_dataset
from utils.dist import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Limited:
    """A loader cut to its first n batches (the learner's loop sees an ordinary iterable)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n
        self.sampler = getattr(loader, "sampler", None)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self):
        return min(self.n, len(self.loader))


def make_learner(cfg, dm, device, task: int, tmp: str):
    learner = get_learner(cfg.model_name)(cfg, device, Path(tmp), cfg.seeds[0])
    for t in range(task):  # earlier tasks: structure only, B made non-zero
        learner.begin_task(t, dm.sizes[t])
        if learner.net.backbone.has_adapter(t):
            with torch.no_grad():
                for layer in learner.net.backbone.layers:
                    layer.lora_B[str(t)].normal_(std=0.02)
        learner.net.backbone.freeze_current()
    lo, hi = dm.task_range(task)
    learner.n_new = hi - lo
    learner.begin_task(task, hi - lo)
    return learner


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--task", type=int, default=0, help="time this task (earlier adapters are made up)")
    ap.add_argument("--max_steps", type=int, default=None, help="cut the epoch to this many batches")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, dict(parse_overrides(rest), progress=False, epochs=1))
    device = resolve_device(cfg.device)
    data = load_dataset(cfg)
    dm = DataManager.for_config(cfg, data, cfg.seeds[0])
    t = args.task
    with tempfile.TemporaryDirectory() as tmp:
        learner = make_learner(cfg, dm, device, t, tmp)
        lo = dm.task_range(t)[0]
        loaders = {}
        for path in ("loader", "device"):
            learner.cfg = replace(cfg, augment_on=path)
            full = learner.loader(dm.train_set(t, learner.train_tf), train=True, task=t)
            steps = min(args.max_steps or len(full), len(full))
            loaders[path] = _Limited(full, steps)
        learner.cfg = cfg
        n_img = sum(len(y) for _, y in loaders["device"])
        x, y = next(iter(loaders["device"]))
        bs = len(y)
        params = [p for p in learner.net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def compute():
            for _ in range(steps):
                with learner._autocast():
                    loss = learner.task_loss(learner.net(x).float(), y, t, lo)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        torch.manual_seed(0)  # the floor: the same timm ViT, frozen, no adapters, a linear head
        vit = create_vit(cfg.backbone_type, False, None, cfg.img_size, cfg.backbone_kwargs).to(device)
        for p in vit.parameters():
            p.requires_grad_(False)
        head = nn.Linear(vit.num_features, learner.net.head.out_features).to(device)
        plain_opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
        xin = x.clone().requires_grad_(True)  # its backward crosses the backbone, as the method's does

        def plain():
            for _ in range(steps):
                with learner._autocast():
                    loss = nn.functional.cross_entropy(head(vit.forward_head(vit.forward_features(xin),
                                                                             pre_logits=True)).float(), y - lo)
                plain_opt.zero_grad(set_to_none=True)
                loss.backward()
                plain_opt.step()

        def epoch(path):
            learner.cfg = replace(cfg, augment_on=path)
            learner.fit(t, loaders[path], learner.param_groups(), 1, desc=f"bench task {t} ({path})")
            learner.cfg = cfg

        def data_only(path):
            for _ in loaders[path]:
                pass

        runs = {"plain": plain, "compute": compute, "loader": lambda: epoch("loader"),
                "device": lambda: epoch("device"), "loader data": lambda: data_only("loader"),
                "device data": lambda: data_only("device")}
        for fn in runs.values():  # warm-up (workers started, caches filled)
            fn()
        secs = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                secs[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in secs.items()}
    rate = {k: (steps * bs if k in ("plain", "compute") else n_img) / med[k] for k in med}
    share = {p: med[f"{p} data"] / med["compute"] for p in ("loader", "device")}
    print(f"# {cfg.model_name} {cfg.backbone_type} img {cfg.img_size} batch {cfg.batch_size} task {t} "
          f"({learner.gate.n_tasks} adapters) device {device} "
          f"workers {cfg.workers} amp {cfg.amp}; {steps} steps, {n_img} images; median of {args.rounds} rounds "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for k in runs:
        extra = ""
        if k in ("loader", "device"):
            extra = (f"   end to end / compute {rate['compute'] / rate[k]:.3f}x, / plain ViT "
                     f"{rate['plain'] / rate[k]:.3f}x")
        elif k == "compute":
            extra = f"   / plain ViT {rate['plain'] / rate[k]:.3f}x"
        elif k.endswith(" data"):
            extra = f"   making the batches alone costs {100 * share[k.split()[0]]:.2f}% of the compute time"
        print(f"{k:12s} {rate[k]:10.1f} img/s  ({med[k]:.3f} s){extra}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
