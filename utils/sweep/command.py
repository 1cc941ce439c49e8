"""The main.py command line of a run in its current state: a new run, a fork of its parent's run folder at
fork_task, or ``--resume`` of its own stopped folder; and the ``--report`` over the finished runs."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

from utils.config.reading import parse_value
from utils.sweep.plan import Status, Step, run_dir
from utils.sweep.spec import Run

#: main.py, which every run is (the repository root: the sweep's runs start from the current directory).
MAIN = Path(__file__).resolve().parents[2] / "main.py"


def cli_value(value: Any) -> str:
    """A config value as main.py's command line reads it back (JSON, a plain string where it stays one)."""
    if isinstance(value, str) and parse_value(value) == value:
        return value
    return json.dumps(value, separators=(",", ":"))


def new_args(run: Run, log_dir: Path, extra: dict, parent_folder: Optional[Path]) -> list[str]:
    """A run from scratch (or a fork of ``parent_folder`` at the run's fork_task) into LOG_DIR/<run id>/."""
    args = ["--fork_from", str(parent_folder), "--fork_task", str(run.fork_task)] if parent_folder else []
    args += ["--config", run.config] + (["--protocol", run.protocol] if run.protocol else [])
    for key, value in run.overrides.items():
        args += [f"--{key}", cli_value(value)]
    if run.seed is not None:
        args += ["--seed", str(run.seed)]
    for key, value in extra.items():
        args += [f"--{key}", cli_value(value)]
    return args + ["--log_dir", str(run_dir(log_dir, run))]


def main_args(step: Step, log_dir: Path, extra: dict, parent: Optional[Step]) -> list[str]:
    """main.py's arguments for a startable step: --resume of a stopped folder, else a new run or a fork."""
    if step.status is Status.STOPPED:
        return ["--resume", str(step.folder.path)]
    parent_folder = None
    if step.run.parent is not None:
        parent_folder = parent.folder.path if parent and parent.folder.path else \
            run_dir(log_dir, parent.run if parent else step.run) / "<its run folder>"
    return new_args(step.run, log_dir, extra, parent_folder)


def shell(python: str, args: list[str]) -> str:
    """A command as a user would type it (for the lines the sweep prints)."""
    return " ".join(shlex.quote(a) for a in [python, "main.py", *args])


def report_args(folders: list[Path], out: Path) -> list[str]:
    """main.py's --report over run folders, its tables and figures in ``out``."""
    return ["--report", *map(str, folders), "--report_out", str(out)]
