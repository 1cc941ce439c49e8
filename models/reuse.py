"""Growth and reuse, shared by the methods that may leave a task without an adapter of its own (fixed growth
schedules, growth on drift, the Gumbel growth rule): the task's adapter leaves the forward pass, and with reuse
the latest earlier adapter is reopened and trains on the task in its place (and is saved with it)."""
from __future__ import annotations

from typing import Optional

import torch

from backbone.vit import LoRAViT
from models.task_state import restore


def latest_adapter_before(backbone: LoRAViT, task: int) -> Optional[int]:
    """The adapter a task without its own would reopen: the latest active one before it."""
    earlier = [t for t in backbone.gate.active_tasks() if t < task]
    return earlier[-1] if earlier else None


def skip_adapter(backbone: LoRAViT, task: int, reuse: bool, adapter: Optional[int] = None) -> None:
    """Task ``task`` keeps no adapter of its own: it leaves the forward pass for good; with ``reuse`` an earlier
    active adapter trains again in its place: ``adapter``, or by default the latest."""
    backbone.gate.prune([task])
    latest = latest_adapter_before(backbone, task) if adapter is None else adapter
    if reuse and latest is not None:
        backbone.serve(task, latest)
        backbone.reopen(latest)
    else:
        backbone.configure()


@torch.no_grad()
def undo_reuse(learner, task: int, adapter: int, state: dict[str, torch.Tensor]) -> None:
    """Back to the task's start after a reuse trial: adapter ``adapter`` frozen again with its factors as they
    were (the ``snapshot`` taken before it was reopened), task ``task``'s own adapter current and active,
    head and alphas as the task began."""
    restore(learner, adapter, state)
    backbone = learner.net.backbone
    backbone.served_by.pop(task, None)
    backbone.gate.revive(task)
    backbone.gate.current = task
    backbone.configure()
