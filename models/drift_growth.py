"""Growth on drift (``drift_threshold``): a task first reuses the latest adapter; it gets one of its own
only if that reuse moves what the earlier classes see too far.

Task t >= 1: the latest active adapter k is reopened (``skip_mode: "reuse"``) and trains, with every alpha
and the head, for ``trial_epochs``. Then, on the first ``probe_images`` of the task's training images (test
transform, no augmentation), the logits of the earlier classes are compared with those the network gave at
the task's start: drift = ||z_after - z_before||_F / ||z_before||_F. The old head rows never train
(masked cross-entropy), so the drift is the change of the features the earlier classes are read from,
measured without any stored image of theirs. drift <= threshold: reuse goes on for the epochs left
(the task costs what SD-LoRA's costs). drift > threshold: the trial is undone (adapter k, alphas and head
back to the task's start, bit for bit) and the task trains its own new adapter for all its epochs
(``trial_epochs`` extra). Every decision is written to ``growth_task_{t}.pt`` and metrics.json's ``growth``.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from models.base import log
from models.reuse import skip_adapter, undo_reuse
from models.task_state import snapshot
from utils import dist
from utils.data.data_manager import TaskDataset
from utils.io import save_torch


def relative_drift(before: torch.Tensor, after: torch.Tensor) -> float:
    """||after - before||_F / ||before||_F (0 when both are empty)."""
    if before.numel() == 0:
        return 0.0
    return float((after - before).norm() / before.norm().clamp_min(1e-12))


class DriftGrowth:
    """The rule above for one learner (``models/sdlora.py``); ``train_task`` replaces its single fit."""

    signal = "drift"  # the record's key that metrics.json's ``growth`` keeps

    def __init__(self, learner):
        self.learner = learner

    def probe_loader(self, loader: DataLoader) -> DataLoader:
        """The task's first ``probe_images`` training images with the test transform: the same images,
        unaugmented, before and after the trial."""
        ds: TaskDataset = loader.dataset
        n = min(len(ds), self.learner.cfg.probe_images)
        probe = ds.subset(range(n))
        probe.transform, probe.augment_seed = self.learner.test_tf, None
        return self.learner.loader(probe, train=False, task=0)

    @torch.no_grad()
    def old_logits(self, probe: DataLoader, lo: int) -> tuple[torch.Tensor, float]:
        """Logits of the classes before the task (head rows < lo) on the probe images, and the task's
        cross-entropy there (over its own classes, as training masks it)."""
        lr, net = self.learner, self.learner.net
        was = net.training
        net.eval()
        outs, loss, n = [], 0.0, 0
        for x, y in probe:
            x, y = x.to(lr.device), y.to(lr.device)
            with lr._autocast():
                z = net(x).float()
            outs.append(z[:, :lo])
            loss += float(torch.nn.functional.cross_entropy(z[:, lo:], y - lo, reduction="sum"))
            n += len(y)
        net.train(was)
        return torch.cat(outs), loss / max(n, 1)

    def train_task(self, task: int, loader: DataLoader, latest: int) -> dict:
        """Trial, decision, then the chosen structure; ``latest`` is the adapter a
        reuse reopens; returns the decision record."""
        lr, c = self.learner, self.learner.cfg
        epochs = lr.epochs(task)
        lo = lr.net.head.out_features - lr.n_new
        probe = self.probe_loader(loader)
        state = snapshot(lr, latest)
        before, loss_before = self.old_logits(probe, lo)
        skip_adapter(lr.net.backbone, task, reuse=True)
        record: dict = {"task": task, "reopened": latest, "threshold": c.drift_threshold,
                        "trial_epochs": c.trial_epochs, "loss_before": loss_before}

        def judge(done: int) -> bool:  # after the trial epochs: stop the reuse fit if it drifts too far
            if done != c.trial_epochs:
                return False
            after, loss_after = self.old_logits(probe, lo)
            record.update(drift=relative_drift(before, after), loss_after_trial=loss_after)
            record["grow"] = bool(dist.broadcast(record["drift"] > c.drift_threshold))  # rank 0 decides
            return record["grow"]

        lr.fit(task, loader, lr.param_groups(), epochs, desc=f"Task {task} (reusing adapter {latest})",
               on_epoch=judge)
        if record["grow"]:
            undo_reuse(lr, task, latest, state)
            lr.fit(task, loader, lr.param_groups(), epochs, desc=f"Task {task} (new adapter)")
        record["trained_adapter"] = lr.net.backbone.owner(task)
        log.info(f"[Drift growth] Task {task}: reusing adapter {latest} for {c.trial_epochs} epoch(s) moved the "
                 f"earlier classes' logits by {record['drift']:.4f} (threshold {c.drift_threshold}): "
                 + ("new adapter" if record["grow"] else f"adapter {latest} goes on serving"))
        save_torch(lr.run_dir / f"growth_task_{task}.pt", record)
        return record
