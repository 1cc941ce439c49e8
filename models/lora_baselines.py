"""The LoRA-for-continual-learning explainer's two references: plain LoRA, no magnitude/direction split.

``seq_lora``: one LoRA trained on every task in turn (it "overwrites task 1"): the class-incremental
lower reference. ``lora_task_id``: one LoRA and one head slice per task, each trained on its task
alone; at evaluation every test image goes through its own task's adapter and is classified among its
own task's classes (the task identity is given): the task-incremental upper reference, saved as
``til_*`` metrics and never as class-incremental accuracy.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from backbone.gate import IsolatedGate
from models import register
from models.base import Learner, log
from utils.data.data_manager import DataManager
from utils.run_metrics import RunMetrics


@register("seq_lora")
class SeqLoRA(Learner):
    """Adapter 0 (w = 1, never frozen nor normalised) trains on task 0 and on every later task."""

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        if task == 0:
            self.net.backbone.add_task(0, self.rank(0), 1.0)
            self.gate.alpha["0"].requires_grad_(False)
        else:
            self.net.backbone.serve(task, 0)  # its checkpoint holds adapter 0 as this task left it
            self.gate.current = 0
            self.net.backbone.configure()
        self.net.to(self.device)

    def end_task(self, task: int) -> None:
        """Nothing is frozen: the one adapter goes on training on the next task."""

    def restore(self, dm: DataManager, done: int) -> None:
        super().restore(dm, done)
        self.gate.current = 0  # the restore leaves adapters frozen; this one never is
        self.net.backbone.configure()


def _check_task_id(cfg, raw: dict) -> list[str]:
    if not cfg.mask_old_logits:
        return ["model_name 'lora_task_id' trains each task's head among its own classes: set "
                "mask_old_logits to true"]
    return []


@register("lora_task_id", check=_check_task_id)
class LoRATaskID(Learner):
    """Adapter t (w = 1, alone in the forward pass) and task t's head rows train on task t alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.book = RunMetrics(self.run_dir, "til_")  # task identity given: til_* keys, never A, A_last, ...

    def make_gate(self, n_layers: int) -> IsolatedGate:
        return IsolatedGate(n_layers)

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        self.net.backbone.add_task(task, self.rank(task), 1.0)
        self.net.to(self.device)

    def use_adapter(self, task) -> None:
        """Make adapter ``task`` the one in the forward pass (None: none)."""
        self.gate.current = task
        self.net.backbone.configure()

    @torch.no_grad()
    def evaluate(self, dm: DataManager, task: int) -> dict:
        """Task-incremental accuracy: the images of task j through adapter j, argmax over task j's classes."""
        self.net.eval()
        dataset = dm.test_set(task, self.test_tf)
        owner = dm.task_of_label(np.asarray(dataset.labels))
        hits, labels, top5 = [], [], 0
        for j in range(task + 1):
            lo, hi = dm.task_range(j)
            self.use_adapter(j)
            subset = torch.utils.data.Subset(dataset, np.nonzero(owner == j)[0].tolist())
            for x, y in tqdm(self.loader(subset, train=False, task=task), desc=f"Eval task {j} of {task}",
                             leave=False, disable=self.cfg.progress_disabled):
                x, y = x.to(self.device), y.to(self.device)
                with self._autocast():
                    logits = self.net(x).float()[:, lo:hi]
                hits.append((logits.argmax(1) + lo == y).cpu())
                labels.append(y.cpu())
                top5 += int((logits.topk(min(5, hi - lo), 1).indices + lo == y[:, None]).any(1).sum())
        self.use_adapter(None)
        hit, y = torch.cat(hits).numpy(), torch.cat(labels).numpy()
        tasks_of = dm.task_of_label(y)
        lo = dm.task_range(task)[0]
        old = hit[y < lo]
        log.info("Task-incremental evaluation (each image through its own task's adapter and classified "
                 "among its task's classes): saved as til_* in metrics.json, not class-incremental accuracy")
        return {
            "per_task": [100.0 * float(hit[tasks_of == j].mean()) for j in range(task + 1)],
            "total": 100.0 * float(hit.mean()),
            "old": 100.0 * float(old.mean()) if old.size else None,
            "new": 100.0 * float(hit[y >= lo].mean()),
            "top5": 100.0 * top5 / len(y),
            "grouped": self._grouped(hit, y, dm, task),
        }
