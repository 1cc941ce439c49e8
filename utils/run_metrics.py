"""A run's metrics.json: what is recorded after each task, how it is saved, loaded back and summarised.

The accuracy keys take a prefix where the task identity is given at evaluation (``til_``: saved as
til_accuracy, til_A, til_A_last, ...), so that they are never read as class-incremental numbers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from utils.io import save_json
from utils.metrics import summarize

log = logging.getLogger("cl")

#: Up to this many tasks train.log shows the whole accuracy matrix after each; past it, the newest row (and the whole
#: matrix after the run's last task).
WHOLE_MATRIX_TASKS = 10
ACCURACY_KEYS = ("accuracy_matrix", "A", "old_accuracy", "new_accuracy", "top5", "A_last", "A_avg", "forgetting")
PER_TASK = ("accuracy_matrix", "A", "old_accuracy", "new_accuracy", "top5", "active_adapters", "adapter_params",
            "train_seconds", "train_steps", "eval_seconds", "peak_memory_mb")


def tasks_recorded(saved: dict) -> int:
    """How many tasks a metrics.json (as ``RunMetrics.saved`` writes it) lists; til_A for task-incremental runs."""
    return len(saved.get("A", saved.get("til_A", [])))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_problem(saved) -> Optional[str]:
    """What is wrong with the shape of a metrics.json (None: nothing): the per-task accuracies must be lists of
    one number per task, the accuracy matrix one row of t + 1 numbers per task t. Said as the end of a sentence
    that starts with the file's name."""
    if not isinstance(saved, dict):
        return f"holds a JSON {type(saved).__name__}, not an object of metrics"
    p = "til_" if "til_A" in saved and "A" not in saved else ""
    a = saved.get(p + "A")
    if not isinstance(a, list) or not all(_number(v) for v in a):
        return f"has no list of per-task accuracies '{p}A'"
    n = len(a)
    matrix_key = p + "accuracy" if p else "accuracy_matrix"
    rows = saved.get(matrix_key)
    if not isinstance(rows, list) or len(rows) != n or any(
            not isinstance(r, list) or len(r) != t + 1 or not all(_number(v) for v in r) for t, r in enumerate(rows)):
        return f"'{matrix_key}' is not {n} rows of accuracies (row t: tasks 0..t), one per task of '{p}A'"
    for key in ("old_accuracy", "new_accuracy", "top5"):
        v = saved.get(p + key)
        if v is not None and (not isinstance(v, list) or len(v) != n):
            return f"'{p + key}' does not hold one entry per task ({n}, as '{p}A')"
    planned = saved.get("tasks_planned")
    if planned is not None and (not isinstance(planned, int) or isinstance(planned, bool) or planned < n):
        return f"'tasks_planned' = {json.dumps(planned)} is not a task count of at least the {n} tasks it lists"
    return None


class RunMetrics:
    """The metrics of one run, recorded task by task and written to ``run_dir/metrics.json`` each time."""

    def __init__(self, run_dir: Path, prefix: str = ""):
        self.path = Path(run_dir) / "metrics.json"
        self.prefix = prefix
        self.values: dict = {k: [] for k in PER_TASK}
        self.tasks_planned: Optional[int] = None  # the run's task count (set by main.py): --report tells a stopped run

    def record(self, res: dict, active: Optional[list], adapter_params: int, train_s: float, train_steps: int,
               eval_s: float, peak_mb: Optional[float]) -> None:
        """Append one task's evaluation (``Learner.evaluate``) and costs, update the summaries, save."""
        m = self.values
        m["accuracy_matrix"].append(res["per_task"])
        m["A"].append(res["total"])
        m["old_accuracy"].append(res["old"])
        m["new_accuracy"].append(res["new"])
        m["top5"].append(res["top5"])
        m["active_adapters"].append(len(active or []))
        m["adapter_params"].append(adapter_params)
        m["train_seconds"].append(train_s)
        m.setdefault("train_steps", []).append(train_steps)
        m["eval_seconds"].append(eval_s)
        m["peak_memory_mb"].append(peak_mb)
        m.update(summarize(m["accuracy_matrix"], m["A"]))

    def save(self) -> None:
        save_json(self.path, self.saved())

    def log_task(self, res: dict, active: Optional[list], task: int) -> None:
        """The log lines of the published code's format (grouped accuracy, curves, matrix, forgetting)."""
        m = self.values
        grouped = dict(res["grouped"], total=round(res["total"], 2),
                       old=None if res["old"] is None else round(res["old"], 2), new=round(res["new"], 2))
        tag = "TIL" if self.prefix else "CNN"
        log.info(f"{tag}: {grouped}")
        log.info(f"{tag} top1 curve: {[round(a, 2) for a in m['A']]}")
        log.info(f"{tag} top5 curve: {[round(a, 2) for a in m['top5']]}")
        log.info(f"Average Accuracy ({tag}): {m['A_avg']:.2f}")
        rows = m["accuracy_matrix"]
        if len(rows) <= WHOLE_MATRIX_TASKS or len(rows) == self.tasks_planned:
            log.info("Accuracy matrix (row t: accuracy on tasks 0..t after task t):\n" + "\n".join(
                " ".join(f"{a:6.2f}" for a in row) for row in rows))
        else:  # the whole matrix again after every task would make the log grow as the cube of the task count
            log.info(f"Accuracy matrix, row {task} (accuracy on tasks 0..{task}; the whole matrix is in metrics.json "
                     f"and in this log after the last task):\n" + " ".join(f"{a:6.2f}" for a in rows[-1]))
        log.info(f"Forgetting ({tag}): {m['forgetting']:.2f}")
        if active is not None:
            log.info(f"Active adapters: {len(active)}/{task + 1}, stored adapter parameters: "
                     f"{m['adapter_params'][-1]:,}")

    def _saved_name(self, key: str) -> str:
        if not self.prefix or key not in ACCURACY_KEYS:
            return key
        return self.prefix + ("accuracy" if key == "accuracy_matrix" else key)

    def saved(self) -> dict:
        """The metrics as metrics.json holds them (accuracy keys prefixed), and the tasks the run plans."""
        out = {self._saved_name(k): v for k, v in self.values.items()}
        if self.tasks_planned is not None:
            out["tasks_planned"] = self.tasks_planned
        return out

    def load(self, saved: dict) -> None:
        """Take back a metrics.json written by ``saved`` (resume)."""
        back = {self._saved_name(k): k for k in self.values}
        self.values = {back.get(k, k): v for k, v in saved.items() if k != "tasks_planned"}
        # a folder written before peak_memory_mb existed: its finished tasks' peaks were not measured (null)
        self.values.setdefault("peak_memory_mb", [None] * tasks_recorded(saved))

    def headline(self) -> str:
        m, p = self.values, self.prefix
        return f"{p}A_last {m['A_last']:.2f}, {p}A_avg {m['A_avg']:.2f}, {p}forgetting {m['forgetting']:.2f}"
