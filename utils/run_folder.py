"""A run folder as ``--resume``, ``--fork_from`` and ``--report`` read it, checked before anything is written.

- its JSON files (config.json, metrics.json): missing, empty, cut short, not JSON, of the wrong shape;
- its per-task files against metrics.json: a finished task without its checkpoint, files of tasks after the next
  one (metrics.json lost, replaced or cut), a checkpoint that names another task or another method;
- whether it takes files (a read-only folder is found before any training, not after a task);
- the path keys a new run folder stores absolute, so that a resume from any directory reads the same files.

Every refusal is a ``RunFolderError`` (exit 2) whose one line names the file and the fix.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from utils.io import CheckpointError, read_metadata
from utils.json_file import JsonFileError, read_json_file
from utils.run_metrics import metrics_problem, tasks_recorded

#: A run folder's per-task files: task_3.safetensors, beta_values_task_3.pt, growth_task_3.pt, ...
TASK_FILE = re.compile(r"^(?:.*_)?task_(\d+)\.(?:safetensors|pt)$")

#: Config keys that name a file or folder: config.json stores them absolute (``resolve_paths``).
PATH_KEYS = ("data_path", "pretrained_path", "protocol")


class RunFolderError(ValueError):
    """A run folder that cannot be resumed, forked or reported as it is; the message names the file and the fix."""


def read_json(path: Path, fix: str) -> Any:
    """A JSON file of a run folder; RunFolderError naming it (and ``fix``) when it is missing, unreadable,
    empty or not JSON."""
    if not path.exists():
        raise RunFolderError(f"'{path}' is missing; {fix}")
    try:
        return read_json_file(path)
    except JsonFileError as e:
        raise RunFolderError(f"'{path}' {e.reason}; {fix}") from None


def read_config(run_dir: Path, flag: str) -> dict:
    """A run folder's config.json as a dict; ``flag`` (--resume, --fork_from, --report) names the argument."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunFolderError(f"{flag} '{run_dir}' does not exist; give a run folder (log_dir/<prefix>_<dataset>_"
                             "<model>_<seed>_<time>)")
    if not run_dir.is_dir():
        raise RunFolderError(f"{flag} '{run_dir}' is a file, not a run folder; give the folder that holds "
                             "config.json")
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunFolderError(f"{flag} '{run_dir}' is not a run folder (no config.json); give the folder a run "
                             "made (it holds config.json, metrics.json, task_*.safetensors)")
    raw = read_json(path, "it is the run's config: restore it from a copy, or start the run again")
    if not isinstance(raw, dict):
        raise RunFolderError(f"'{path}' holds a JSON {type(raw).__name__}, not an object of config keys; restore it "
                             "from a copy, or start the run again")
    return raw


def read_metrics(run_dir: Path) -> Optional[dict]:
    """A run folder's metrics.json (None where there is none), checked for shape (run_metrics.metrics_problem)."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    fix = "it lists the finished tasks: restore it from a copy, or start the run again in a new folder"
    metrics = read_json(path, fix)
    problem = metrics_problem(metrics)
    if problem:
        raise RunFolderError(f"'{path}' {problem}; {fix}")
    return metrics


def task_files(run_dir: Path) -> dict[int, list[str]]:
    """The per-task files of a run folder by task."""
    out: dict[int, list[str]] = {}
    for f in sorted(Path(run_dir).iterdir()):
        m = TASK_FILE.match(f.name)
        if m and f.is_file():
            out.setdefault(int(m.group(1)), []).append(f.name)
    return out


def check_checkpoints(run_dir: Path, tasks: range, model_name: str, role: str = "") -> None:
    """Each task of ``tasks`` has its checkpoint, readable, saved for that task by that method (its metadata)."""
    run_dir = Path(run_dir)
    missing = [f"task_{t}.safetensors" for t in tasks if not (run_dir / f"task_{t}.safetensors").is_file()]
    if missing:
        first = int(missing[0][5:].split(".")[0])
        keep = (f"or fork the tasks before it: --fork_from {run_dir} --fork_task {first}" if first > 0
                else "or start the run again")
        raise RunFolderError(f"{role}'{run_dir}': metrics.json lists task(s) {tasks.start}..{tasks.stop - 1} as done, "
                             f"but {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"{'is' if len(missing) == 1 else 'are'} missing; restore the file(s), {keep}")
    for t in tasks:
        path = run_dir / f"task_{t}.safetensors"
        meta = read_metadata(path)  # CheckpointError naming the file when its header is damaged
        if meta.get("task", str(t)) != str(t):
            raise CheckpointError(f"checkpoint '{path}' holds task {meta['task']}'s tensors (its metadata), not task "
                                  f"{t}'s: copied from elsewhere? Restore the run's own file")
        if meta.get("model_name", model_name) != model_name:
            raise CheckpointError(f"checkpoint '{path}' was saved by model_name '{meta['model_name']}', "
                                  f"but config.json says '{model_name}': the folder mixes two runs; "
                                  "restore the run's own file")


def check_resumable(run_dir: Path, cfg, metrics: Optional[dict]) -> int:
    """The tasks a folder has finished (metrics.json), once its files agree with it; RunFolderError otherwise.

    A checkpoint (and the other files) of the task right after the last finished one may be there without its
    metrics entry: the run was stopped between writing them, and that task is trained again. Files of any
    later task, or a finished task without its checkpoint, mean the folder's files disagree: resuming would
    retrain finished tasks over their files, so it is refused, naming the files."""
    run_dir = Path(run_dir)
    done = tasks_recorded(metrics) if metrics is not None else 0
    later = sorted((t, f) for t, names in task_files(run_dir).items() if t > done for f in names)
    if later:
        have = (f"metrics.json lists tasks 0..{done - 1} as done" if done else
                "metrics.json is missing" if metrics is None else "metrics.json lists no finished task")
        names = ", ".join(f for _, f in later[:4]) + (" ..." if len(later) > 4 else "")
        raise RunFolderError(f"'{run_dir}': {have}, but files of later tasks are there ({names}): the folder's "
                             "files disagree (metrics.json lost, replaced or cut?), and resuming would overwrite "
                             "them; restore the run's metrics.json from a copy, or start the run again in a new "
                             "folder")
    if done and not cfg.save_adapters:
        raise RunFolderError(f"'{run_dir}' was run with save_adapters false: it keeps no checkpoints, so it cannot "
                             f"continue after task {done - 1}; start it again (save_adapters true makes runs "
                             "resumable)")
    check_checkpoints(run_dir, range(done), cfg.model_name)
    return done


def check_writable(run_dir: Path) -> None:
    """A folder a run will write in takes files, and the files it appends to can be written."""
    run_dir = Path(run_dir)
    fix = ("make it writable (chmod -R u+w), or copy the folder somewhere writable and resume the copy "
           "(its config.json names its data by absolute paths)")
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise RunFolderError(f"run folder '{run_dir}' is not writable ({e.strerror or e}); {fix}") from None
    for name in (".lock", "train.log", "epochs.csv", "tasks.csv"):
        p = run_dir / name
        if p.exists() and not os.access(p, os.W_OK):
            raise RunFolderError(f"'{p}' is read-only; {fix}")


def default_data_path(dataset: str) -> Optional[str]:
    """Where a dataset is read from when data_path is null (None: generated, no files)."""
    from utils.data.datasets import DEFAULT_PATHS
    return DEFAULT_PATHS.get(dataset)


def resolve_paths(cfg):
    """The config with its path keys absolute (from the current directory) and data_path's default written out,
    so that a run folder's config.json names the same files from any directory. A null pretrained_path (the hub)
    and protocol stay null."""
    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else os.path.abspath(os.path.expanduser(p))
    return replace(cfg, data_path=absolute(cfg.data_path or default_data_path(cfg.dataset)),
                   pretrained_path=absolute(cfg.pretrained_path), protocol=absolute(cfg.protocol))


def check_saved_paths(raw: dict, run_dir: Path) -> None:
    """A config.json written before run folders stored absolute paths names its files relative to the directory
    the run was started from: refuse a resume from elsewhere, naming the key, rather than fail on the data."""
    for key in ("data_path", "pretrained_path"):
        value = raw.get(key)
        if key == "data_path" and value is None:
            value = default_data_path(raw.get("dataset", "cifar100"))
        if isinstance(value, str) and not os.path.isabs(value) and not os.path.exists(value):
            raise RunFolderError(f"'{Path(run_dir) / 'config.json'}' names {key} '{value}' relative to the directory "
                                 f"the run was started from, and it is not found from {os.getcwd()}; run --resume "
                                 "from that directory")
