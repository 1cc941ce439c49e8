"""The planner: each run's state read from its run folder, never from a console log.

A run's folder is the one folder holding config.json in LOG_DIR/<run id>/. Its metrics.json says how far it got
(``tasks_recorded`` of ``tasks_planned``): every planned task -> done (skipped); fewer -> stopped (resumed with
--resume). A run with no folder yet is ready, or, when it forks a parent at task K, waiting until the parent's
folder lists K tasks; blocked when the parent will not get there (it failed, ended short, or is not selected).
"""
from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from utils.run_folder import RunFolderError, read_metrics
from utils.run_metrics import tasks_recorded
from utils.sweep.spec import Run


class Status(str, Enum):
    DONE = "done"          # metrics.json lists every planned task: not run again
    STOPPED = "stopped"    # a run folder with fewer tasks: resumed
    READY = "ready"        # no run folder yet: started (or forked from its parent)
    WAITING = "waiting"    # its parent has fewer than fork_task tasks so far, and is on its way
    RUNNING = "running"    # started by this sweep, or its folder is held by a live process elsewhere
    FAILED = "failed"      # started by this sweep and ended before its last task
    BLOCKED = "blocked"    # its parent failed, ended short of fork_task, or is not selected
    BROKEN = "broken"      # its log_dir cannot be read as one run (two run folders, a damaged metrics.json)


#: States in which a run still needs starting: the executor starts these.
STARTABLE = (Status.READY, Status.STOPPED)


@dataclass
class Folder:
    """What a run's log_dir holds: its run folder (None: none yet) and how far it got."""
    path: Optional[Path] = None
    done: int = 0
    planned: Optional[int] = None
    holder: Optional[str] = None   # "pid N on HOST" while a process trains it
    problem: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.path is not None and self.planned is not None and self.done >= self.planned

    def progress(self) -> str:
        return f"{self.done}/{self.planned if self.planned is not None else '?'} tasks"


@dataclass
class Step:
    """A run's state in this plan, with the folder it was read from and why (for waiting / blocked / broken)."""
    run: Run
    status: Status
    folder: Folder
    reason: str = ""


def run_dir(log_dir: Path, run: Run) -> Path:
    """A run's own log_dir: LOG_DIR/<run id>/ (main.py makes its run folder inside)."""
    return Path(log_dir) / run.id


def console_log(log_dir: Path, run: Run) -> Path:
    """Where a run's output goes: LOG_DIR/<run id>.out (appended to on resume)."""
    return Path(log_dir) / f"{run.id}.out"


def lock_holder(folder: Path) -> Optional[str]:
    """Who holds a run folder's lock (main.py's RunLock): "pid N on HOST", or None when no live process does."""
    path = folder / ".lock"
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        return None
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken
    return None


def read_folder(path: Path, probe_lock: bool = True) -> Folder:
    """The run folder inside a run's log_dir and its progress (metrics.json), or the problem that hides it."""
    if not path.is_dir():
        return Folder()
    found = sorted(d for d in path.iterdir() if d.is_dir() and (d / "config.json").is_file())
    if len(found) > 1:
        return Folder(problem=f"{path} holds {len(found)} run folders ({', '.join(d.name for d in found)}); a sweep "
                              "run keeps one: move the others away")
    if not found:
        return Folder()
    folder = found[0]
    try:
        metrics = read_metrics(folder)
    except RunFolderError as e:
        return Folder(path=folder, problem=str(e))
    done = tasks_recorded(metrics) if metrics else 0
    planned = metrics.get("tasks_planned") if metrics else None
    out = Folder(path=folder, done=done, planned=planned)
    if probe_lock and not out.finished:
        out.holder = lock_holder(folder)
    return out


def plan(runs: list[Run], log_dir: Path, selected: Optional[set[str]] = None, active: frozenset[str] = frozenset(),
         failed: frozenset[str] = frozenset()) -> dict[str, Step]:
    """Every run's state, parents first. ``selected``: the runs this sweep may start (default: all); ``active``:
    the runs it has going (started, or queued on the cluster); ``failed``: those it started that ended short."""
    by_id = {r.id: r for r in runs}
    selected = set(by_id) if selected is None else selected
    steps: dict[str, Step] = {}

    def step(run: Run) -> Step:
        if run.id not in steps:
            steps[run.id] = decide(run, read_folder(run_dir(log_dir, run), run.id not in active),
                                   step(by_id[run.parent]) if run.parent else None, run.parent in selected,
                                   run.id in active, run.id in failed)
        return steps[run.id]

    for run in runs:
        step(run)
    return steps


def decide(run: Run, folder: Folder, parent: Optional[Step], parent_selected: bool, active: bool,
           failed: bool) -> Step:
    """One run's state from its folder, what this sweep knows of it, and its parent's step."""
    if folder.problem:
        return Step(run, Status.BROKEN, folder, folder.problem)
    if folder.finished:
        return Step(run, Status.DONE, folder)
    if active:
        return Step(run, Status.RUNNING, folder)
    if folder.holder:
        return Step(run, Status.RUNNING, folder, f"held by {folder.holder} (not started here)")
    if failed:
        return Step(run, Status.FAILED, folder, f"ended at {folder.progress()}")
    if folder.path is not None:
        return Step(run, Status.STOPPED, folder)
    if parent is None:
        return Step(run, Status.READY, folder)
    k, have = run.fork_task, parent.folder.done
    if have >= k:
        return Step(run, Status.READY, folder)
    short = f"parent {parent.run.id} has {have} of the {k} tasks it forks at"
    if parent.status is Status.DONE:
        return Step(run, Status.BLOCKED, folder, f"{short}, and is finished")
    if parent.status in (Status.FAILED, Status.BLOCKED, Status.BROKEN):
        return Step(run, Status.BLOCKED, folder, f"{short}: it is {parent.status.value}")
    if parent.status is Status.RUNNING or (parent.status in (Status.READY, Status.STOPPED, Status.WAITING)
                                           and parent_selected):
        return Step(run, Status.WAITING, folder, f"for {parent.run.id} to finish task {k - 1} ({have} done)")
    return Step(run, Status.BLOCKED, folder, f"{short} and is not selected (--only): select it too")
