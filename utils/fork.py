"""Runs that fork: a new run folder that keeps a parent run's first k tasks and trains the later ones under a
new config (``python main.py --fork_from RUN_DIR --fork_task k [--config FILE] [--key value ...]``).

The parent is only read. Its task files for tasks 0..k-1 are copied, its metrics.json is cut to those tasks,
and the new folder's ``fork.json`` names the parent. What the first k tasks were trained on must be the same
in both configs (data, class order, seed, backbone, adapter shapes, the shifted tasks and the adapters grown
so far); the rest (optimiser, epochs, the growth rule, ...) may change, since it only shapes tasks k on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from utils.config.schema import Config, ConfigError
from utils.io import load_tensors, save_json
from utils.metrics import summarize
from utils.run_folder import TASK_FILE, RunFolderError, check_checkpoints, read_metrics
from utils.run_metrics import tasks_recorded

#: Keys that shaped the parent's first tasks (or what the classes are): a fork must keep them.
MUST_MATCH = ("model_name", "dataset", "data_path", "expected_classes", "synthetic_classes", "shuffle", "init_cls",
              "increment", "train_per_class", "test_per_class", "img_size", "normalize", "backbone_type",
              "pretrained", "pretrained_path", "backbone_kwargs", "lora_targets", "lora_rank", "rank_schedule",
              "direction_norm", "intrinsic_dim", "allocation_mode", "allocation_ratio", "subspace_norm",
              # the first tasks were evaluated under the head (models/heads.py): the metrics kept are its
              "head", "ranpac_dim", "drift_compensation", "sdc_sigma", "align_samples", "align_epochs", "align_lr",
              "align_temperature", "first_session_head")

def tasks_done(run_dir: Path) -> int:
    """How many tasks a run folder has completed (metrics.json lists them); RunFolderError if it is damaged."""
    metrics = read_metrics(run_dir)
    return 0 if metrics is None else tasks_recorded(metrics)


def own_adapters(parent: Path, k: int) -> list[int]:
    """The tasks below k that grew an adapter of their own in the parent (its checkpoints say so)."""
    mask = load_tensors(parent / f"task_{k - 1}.safetensors").get("gate.pruning_mask")
    grew = []
    for t in range(k):
        ck = load_tensors(parent / f"task_{t}.safetensors")
        owner = int(ck["adapter.owner"]) if "adapter.owner" in ck else t
        stored = "adapter.0.A" in ck or "subspace.z" in ck
        if owner == t and stored and (mask is None or bool(mask[t])):
            grew.append(t)
    return grew


def check_fork(parent: Path, parent_cfg: Config, child: Config, k: int) -> None:
    """Refuse a fork whose first k tasks would not be the parent's, naming the key and both values."""
    done = tasks_done(parent)
    if done == 0:
        raise ConfigError(f"--fork_from '{parent}' has no finished task (no metrics.json): nothing to fork; fork a run "
                          "that finished task 0, or start this one afresh with --config")
    if k < 1 or k > done:
        raise ConfigError(f"--fork_task {k}: the parent '{parent}' has completed tasks 0..{done - 1}; fork at a "
                          f"task in 1..{done} (tasks 0..k-1 are kept)")
    if not parent_cfg.save_adapters:
        raise ConfigError(f"the parent '{parent}' was run with save_adapters false: it has no checkpoints to fork")
    try:  # the files the fork copies, checked in the parent (a missing one is named there, not in the copy)
        check_checkpoints(parent, range(k), parent_cfg.model_name, role="the parent ")
    except RunFolderError as e:
        raise RunFolderError(f"cannot fork: {e}") from None
    errors = []
    for key in MUST_MATCH:
        a, b = getattr(parent_cfg, key, None), getattr(child, key, None)
        if a != b:
            errors.append(f"config key '{key}' = {json.dumps(b)} differs from the parent's {json.dumps(a)}: the "
                          f"first {k} tasks were trained with it; fork with the parent's value")
    if child.seeds != parent_cfg.seeds[:1]:
        errors.append(f"config key 'seed' = {json.dumps(child.seed)} must be the parent's seed {parent_cfg.seeds[0]}")
    early = lambda tasks: sorted(t for t in tasks if t < k)  # noqa: E731
    if early(child.shift_tasks) != early(parent_cfg.shift_tasks):
        errors.append(f"config key 'shift_tasks' = {child.shift_tasks} differs from the parent's "
                      f"{parent_cfg.shift_tasks} below task {k}")
    elif early(child.shift_tasks) and child.shift_kind != getattr(parent_cfg, "shift_kind", "grey_invert"):
        errors.append(f"config key 'shift_kind' = {json.dumps(child.shift_kind)} differs from the parent's: its "
                      f"shifted tasks {early(child.shift_tasks)} below task {k} were shown another way")
    if child.growth_schedule is not None:
        grew = own_adapters(parent, k)
        if early(child.growth_schedule) != grew:
            errors.append(f"config key 'growth_schedule' = {child.growth_schedule} "
                          f"lists {early(child.growth_schedule)} "
                          f"below task {k}, but the parent grew adapters at {grew}; the schedule must agree there")
    if errors:
        raise ConfigError("cannot fork:\n" + "\n".join(errors))


def cut_metrics(metrics: dict, k: int) -> dict:
    """metrics.json as it was after task k-1: per-task lists cut, per-task records filtered, summaries redone."""
    n = tasks_recorded(metrics)
    out = {}
    for key, value in metrics.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) and "task" in v for v in value):
            out[key] = [v for v in value if v["task"] < k]
        elif isinstance(value, list):
            if len(value) != n:
                raise ConfigError(f"cannot fork: metrics.json's '{key}' has {len(value)} entries for {n} tasks")
            out[key] = value[:k]
        else:
            out[key] = value
    for p in ("", "til_"):
        if p + "A" in out:
            matrix = out["accuracy_matrix" if not p else "til_accuracy"]
            out.update({p + name: v for name, v in summarize(matrix, out[p + "A"]).items()})
    return out


def copy_prefix(parent: Path, run_dir: Path, k: int, parent_config: dict) -> list[str]:
    """Copy the parent's files of tasks 0..k-1 and its cut metrics into run_dir; write fork.json."""
    copied = []
    for f in sorted(parent.iterdir()):
        m = TASK_FILE.match(f.name)
        if f.is_file() and m and int(m.group(1)) < k:
            shutil.copy2(f, run_dir / f.name)
            copied.append(f.name)
    save_json(run_dir / "metrics.json", cut_metrics(json.loads((parent / "metrics.json").read_text()), k))
    save_json(run_dir / "fork.json", {"parent": str(parent.resolve()), "fork_task": k, "copied": copied,
                                      "parent_config": parent_config})
    return copied
