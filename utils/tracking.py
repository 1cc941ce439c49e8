"""Experiment tracking (``loggers``): scalars per epoch and per task to TensorBoard, wandb (offline) or CSV.

Per epoch: ``train/loss``, ``train/accuracy`` and whatever the method adds (Gumbel: ``gate/tau``,
``gate/beta_new``); per task: ``task/A``, ``task/old_accuracy``, ``task/new_accuracy``,
``task/active_adapters``, ``task/train_seconds``. The step of an epoch scalar is the run's epoch count
(``task * 1000 + epochs already run in the task``, so a resumed run continues the same axis); a task scalar's
step is the task. Rank 0 alone writes; a resumed run appends to the same files (``RUN_DIR/tb/``,
``RUN_DIR/epochs.csv``, ``RUN_DIR/tasks.csv``, and the wandb run whose id is the run folder's name).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

from utils import dist

INSTALL = 'pip install -e ".[tracking]"'


class TrackingError(ImportError):
    """A logger whose package is not installed: the message says how to install it."""


class _CSV:
    """Two flat files: epochs.csv (task, epoch step, description, key, value) and tasks.csv (task, key, value)."""

    def __init__(self, run_dir: Path):
        self.files = {kind: run_dir / f"{kind}.csv" for kind in ("epochs", "tasks")}
        for kind, path in self.files.items():
            if not path.exists():
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(["task", "step", "desc", "key", "value"] if kind == "epochs"
                                           else ["task", "key", "value"])

    def epoch(self, task: int, step: int, desc: str, scalars: dict) -> None:
        with open(self.files["epochs"], "a", newline="") as f:
            w = csv.writer(f)
            for k, v in scalars.items():
                w.writerow([task, step, desc, k, v])

    def task(self, task: int, scalars: dict) -> None:
        with open(self.files["tasks"], "a", newline="") as f:
            w = csv.writer(f)
            for k, v in scalars.items():
                w.writerow([task, k, v])

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError(f"config key 'loggers' asks for \"tensorboard\", which is not installed: {INSTALL} "
                                "(or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def epoch(self, task: int, step: int, desc: str, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def task(self, task: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, task)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """wandb in offline mode: nothing needs the network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads."""

    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise TrackingError(f"config key 'loggers' asks for \"wandb\", which is not installed: {INSTALL} "
                                "(or pip install wandb)") from None
        self.run = wandb.init(mode="offline", dir=str(run_dir), id=run_dir.name, name=run_dir.name,
                              config=config, resume="allow", reinit=True)

    def epoch(self, task: int, step: int, desc: str, scalars: dict) -> None:
        self.run.log(dict(scalars, epoch_step=step))

    def task(self, task: int, scalars: dict) -> None:
        self.run.log(dict(scalars, task=task))

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The configured loggers of one run; every call is a no-op without loggers and off rank 0."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: Optional[dict] = None):
        self.backends = []
        if not dist.is_main():
            return
        make = {"csv": lambda: _CSV(run_dir), "tensorboard": lambda: _TensorBoard(run_dir),
                "wandb": lambda: _Wandb(run_dir, config or {})}
        self.backends = [make[n]() for n in names]

    def epoch(self, task: int, step: int, desc: str, scalars: dict) -> None:
        for b in self.backends:
            b.epoch(task, step, desc, scalars)

    def task(self, task: int, scalars: dict) -> None:
        for b in self.backends:
            b.task(task, {k: v for k, v in scalars.items() if v is not None})

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def check_loggers(names: Sequence[str]) -> None:
    """Before any run folder exists: each asked-for logger's package imports, else TrackingError."""
    for n in names:
        module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(n)
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError:
            raise TrackingError(f"config key 'loggers' asks for \"{n}\", which is not installed: {INSTALL}") from None
