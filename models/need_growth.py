"""Growth on need (``need_threshold``): a task gets an adapter of its own only if a new adapter fits its
held-out images better than reusing the latest one does.

Task t >= 1: a seeded ``need_holdout`` share of each class's training images is held out. Two trials, each
``trial_epochs`` on the rest, from the same start: the latest active adapter k reopened (reuse), then, with
k, alphas and head put back, the task's own new adapter. After each, the task's cross-entropy over its own
classes on the held-out images (test transform): the need is gain = loss_reuse - loss_new, in nats, a
measure on images neither trial trained on, with the same cost for every task (it does not fall with the
number of tasks an adapter serves). gain > threshold: the new adapter goes on; else the reuse trial's state
comes back and reuse goes on. Either way the winner trains ``epochs - trial_epochs`` more on every image, so a
task costs SD-LoRA's epochs plus ``2 * trial_epochs * (1 - need_holdout)`` epochs of trials minus one.

``need_signal: "fit"`` runs the reuse trial alone and asks how well reuse fits the task: fit = loss_reuse /
ln(classes of the task), 1 being a uniform guess. fit > threshold: the trial is undone and the new adapter
trains all ``epochs`` on every image; else reuse goes on for ``epochs - trial_epochs`` (docs/growth.md: on the
quick protocol the one-epoch gain was as large on plain tasks as on shifted ones; the fit was not).
Every decision is written to ``growth_task_{t}.pt`` and metrics.json's ``growth``.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from models.base import log, task_seed
from models.reuse import skip_adapter, undo_reuse
from models.task_state import restore, snapshot
from utils import dist
from utils.data.data_manager import split_per_class
from utils.io import save_torch


class NeedGrowth:
    """The rule above for one learner (``models/sdlora.py``); ``train_task`` replaces its single fit."""

    def __init__(self, learner):
        self.learner = learner
        self.signal = learner.cfg.need_signal  # the record's key that metrics.json's ``growth`` keeps

    def split(self, task: int, loader: DataLoader) -> tuple[DataLoader, DataLoader]:
        """The trials' training loader (augmented) and the held-out one (test transform, no augmentation)."""
        lr = self.learner
        ds = loader.dataset
        learn, judge = split_per_class(ds.labels, lr.cfg.need_holdout, task_seed(lr.seed, task))
        held = ds.subset(judge)
        held.transform, held.augment_seed = lr.test_tf, None
        return lr.loader(ds.subset(learn), train=True, task=task), lr.loader(held, train=False, task=0)

    @torch.no_grad()
    def held_out_loss(self, loader: DataLoader, lo: int) -> float:
        """The task's cross-entropy over its own classes (head rows >= lo), as training masks it."""
        lr, net = self.learner, self.learner.net
        was = net.training
        net.eval()
        loss, n = torch.zeros((), dtype=torch.float64, device=lr.device), 0
        for x, y in loader:
            x, y = x.to(lr.device), y.to(lr.device)
            with lr._autocast():
                z = net(x).float()
            loss += torch.nn.functional.cross_entropy(z[:, lo:], y - lo, reduction="sum").double()
            n += len(y)
        net.train(was)
        return float(dist.all_sum(loss) / max(float(dist.all_sum(torch.tensor(float(n)))), 1.0))

    def train_task(self, task: int, loader: DataLoader, latest: int) -> dict:
        """The reuse trial, the new-adapter trial (``need_signal: "gain"``), the decision, then the winner;
        ``latest`` is the adapter a reuse reopens; returns the decision record."""
        lr, c = self.learner, self.learner.cfg
        epochs = lr.epochs(task)
        lo = lr.net.head.out_features - lr.n_new
        learn, held = self.split(task, loader)
        start = snapshot(lr, latest)
        skip_adapter(lr.net.backbone, task, reuse=True)
        lr.fit(task, learn, lr.param_groups(), c.trial_epochs, desc=f"Task {task} trial: reusing adapter {latest}")
        loss_reuse = self.held_out_loss(held, lo)
        record = {"task": task, "reopened": latest, "threshold": c.need_threshold, "trial_epochs": c.trial_epochs,
                  "signal": c.need_signal, "loss_reuse": loss_reuse}
        if c.need_signal == "fit":
            record["fit"] = loss_reuse / math.log(max(lr.n_new, 2))  # 1 = a uniform guess over the task's classes
            grow = bool(dist.broadcast(record["fit"] > c.need_threshold))  # rank 0 decides
            if grow:
                undo_reuse(lr, task, latest, start)  # the trial is gone: the new adapter trains every epoch
            rest = epochs if grow else epochs - c.trial_epochs
            said = f"fit {record['fit']:.4f} of chance"
        else:
            reused = snapshot(lr, latest)
            undo_reuse(lr, task, latest, start)
            lr.fit(task, learn, lr.param_groups(), c.trial_epochs, desc=f"Task {task} trial: a new adapter")
            record["loss_new"] = self.held_out_loss(held, lo)
            record["gain"] = loss_reuse - record["loss_new"]
            grow = bool(dist.broadcast(record["gain"] > c.need_threshold))  # rank 0 decides
            if not grow:
                skip_adapter(lr.net.backbone, task, reuse=True)
                restore(lr, latest, reused)  # the reuse trial's adapter, alphas and head, as it ended
            rest = epochs - c.trial_epochs
            said = f"with a new adapter {record['loss_new']:.4f}, gain {record['gain']:+.4f}"
        record.update(grow=grow, trained_adapter=lr.net.backbone.owner(task))
        log.info(f"[Need growth] Task {task}: held-out loss reusing adapter {latest} {loss_reuse:.4f}, {said} "
                 f"(threshold {c.need_threshold}): " + ("new adapter" if grow else f"adapter {latest} goes on serving"))
        if rest > 0:
            lr.fit(task, loader, lr.param_groups(), rest,
                   desc=f"Task {task} ({'new adapter' if grow else f'reusing adapter {latest}'})")
        save_torch(lr.run_dir / f"growth_task_{task}.pt", record)
        return record
