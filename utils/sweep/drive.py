"""The loop every executor shares: plan from the run folders, start what is startable while slots are free, note
what ended, print a line per row (started, ended, waiting, progress), and report over the finished runs at the end.

A launcher (local processes, SLURM jobs) only starts runs and says which have ended; the state of a run is read
again from its folder every round, so a rerun of the same sweep picks up where the last one stopped.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Protocol

from utils.sweep.command import MAIN, main_args, report_args, shell
from utils.sweep.plan import STARTABLE, Status, Step, console_log, plan, read_folder, run_dir
from utils.sweep.spec import Sweep

#: Exit codes of a sweep: 0 every selected run finished; 1 some failed, are blocked or broken; 130 / 143 stopped.
EXIT_INCOMPLETE = 1


class Launcher(Protocol):
    """Starts runs and reports their ends: the part of an executor that differs between a machine and a cluster."""
    slots: int          # how many runs it may have going at once
    wait_s: float       # seconds between two plans while nothing happens

    def start(self, launches: list[tuple[Step, list[str]]]) -> None: ...
    def poll(self) -> dict[str, int]: ...          # runs that ended since the last poll: their exit codes
    def active(self) -> frozenset[str]: ...        # runs started and not yet ended
    def wait(self, seconds: float) -> None: ...    # until a run may have ended, at most this long
    def stop(self, signum: int) -> None: ...       # the sweep was interrupted: stop (or leave) what it started


class Stopped(Exception):
    """The sweep received SIGTERM."""


@dataclass
class Drive:
    """One pass of a sweep over its selected runs with a launcher, until nothing more can start or end."""
    sweep: Sweep
    selected: list[str]
    launcher: Launcher
    log_dir: Path
    python: str
    progress_every: float = 60.0
    reports: bool = True
    say: Callable[[str], None] = print
    failed: set[str] = field(default_factory=set)
    started: dict[str, float] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)
    eventful: bool = False

    def plan(self) -> dict[str, Step]:
        return plan(self.sweep.runs, self.log_dir, set(self.selected), self.launcher.active(), frozenset(self.failed))

    def step(self) -> bool:
        """One round: start what can start, note what ended; False once nothing is going and nothing can start."""
        steps = self.plan()
        self.announce(steps)
        free = self.launcher.slots - len(self.launcher.active())
        todo = [steps[i] for i in self.selected if steps[i].status in STARTABLE and i not in self.started]
        launch = todo[:max(free, 0)]
        if launch:
            self.launcher.start([(s, self.args(s, steps)) for s in launch])
            for s in launch:
                self.started[s.run.id] = time.monotonic()
                verb = f"resumes at {s.folder.progress()}" if s.status is Status.STOPPED else "starts"
                self.say(f"=== {s.run.id}: {verb}: {shell(self.python, self.args(s, steps))}")
        ended = self.launcher.poll()
        for rid, code in ended.items():
            self.ended(rid, code)
        waiting = any(steps[i].status is Status.WAITING for i in self.selected)
        self.eventful = bool(launch or ended)
        return bool(self.eventful or self.launcher.active() or len(todo) > len(launch) or waiting)

    def args(self, s: Step, steps: dict[str, Step]) -> list[str]:
        return main_args(s, self.log_dir, self.sweep.extra, steps.get(s.run.parent) if s.run.parent else None)

    def ended(self, rid: str, code: int) -> None:
        run = self.sweep.by_id()[rid]
        folder = read_folder(run_dir(self.log_dir, run), probe_lock=False)
        took = f", {time.monotonic() - self.started[rid]:.0f} s" if rid in self.started else ""
        if code == 0 and folder.finished:
            self.say(f"=== {rid}: done ({folder.progress()}{took}): {folder.path}")
            return
        self.failed.add(rid)
        self.say(f"=== {rid}: ended with exit {code} at {folder.progress()}{took}; its output: "
                 f"{console_log(self.log_dir, run)}")

    def announce(self, steps: dict[str, Step]) -> None:
        """A line for each selected run whose waiting / finished / blocked state is new."""
        for rid in self.selected:
            s = steps[rid]
            if s.status in STARTABLE or (s.status is Status.RUNNING and rid in self.launcher.active()):
                continue  # said when started (or, for a queued job, when the launcher found it)
            line = {Status.DONE: f"finished before ({s.folder.progress()} in {s.folder.path}), not run again",
                    Status.WAITING: f"waits {s.reason}",
                    Status.RUNNING: f"running elsewhere: {s.reason}"}.get(s.status, f"not started: {s.reason}")
            if s.status is Status.DONE and rid in self.started or s.status is Status.FAILED:
                continue  # said when it ended
            if self.said.get(rid) != line:
                self.said[rid] = line
                self.say(f"=== {rid}: {line}")

    def progress(self) -> None:
        """A line per run still going: how many tasks its folder lists, and the seconds since it started."""
        for rid in sorted(self.launcher.active(), key=self.selected.index):
            folder = read_folder(run_dir(self.log_dir, self.sweep.by_id()[rid]), probe_lock=False)
            where = folder.progress() if folder.path else "starting"
            took = f", {time.monotonic() - self.started[rid]:.0f} s" if rid in self.started else ""
            self.say(f"... {rid}: {where}{took}")

    def run(self) -> int:
        """Rounds until the end, progress lines between them, then the summary and the report; the exit code."""
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        last = time.monotonic()
        try:
            while self.step():
                if time.monotonic() - last >= self.progress_every:
                    self.progress()
                    last = time.monotonic()
                if not self.eventful:  # something started or ended: plan again at once
                    self.launcher.wait(self.launcher.wait_s)
        except (KeyboardInterrupt, Stopped) as e:
            signum = signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT
            self.launcher.stop(signum)
            self.say("sweep stopped: completed tasks are saved; run the same command again to go on (finished "
                     "runs are skipped, stopped ones resume)")
            return 143 if signum == signal.SIGTERM else 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.finish(self.plan())

    def finish(self, steps: dict[str, Step]) -> int:
        """The tally over the selected runs, and main.py --report over the finished ones."""
        by: dict[Status, list[str]] = {}
        for rid in self.selected:
            by.setdefault(steps[rid].status, []).append(rid)
        self.say("sweep: " + ", ".join(f"{len(v)} {k.value}" for k, v in by.items()))
        for status in (Status.FAILED, Status.BLOCKED, Status.BROKEN):
            for rid in by.get(status, []):
                self.say(f"  {rid}: {status.value}: {steps[rid].reason}")
        if self.reports:
            report(steps, [i for i in self.selected if steps[i].status is Status.DONE], self.log_dir, self.python,
                   self.say)
        bad = any(by.get(s) for s in (Status.FAILED, Status.BLOCKED, Status.BROKEN, Status.STOPPED, Status.READY))
        return EXIT_INCOMPLETE if bad else 0


def _raise_stopped(signum, frame):
    raise Stopped()


def report(steps: dict[str, Step], done: list[str], log_dir: Path, python: str,
           say: Callable[[str], None] = print) -> Optional[Path]:
    """``main.py --report`` over the finished runs (task-incremental ones named and left out, as --report
    refuses them), into LOG_DIR/report_<time>/; the folder, or None when there is nothing to report."""
    folders = []
    for rid in done:
        path = steps[rid].folder.path
        if "til_A" in json.loads((path / "metrics.json").read_text()):
            say(f"(task-incremental run, til_* metrics, not in the report: {path})")
        else:
            folders.append(path)
    if not folders:
        return None
    out = log_dir / f"report_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    subprocess.run([python, str(MAIN), *report_args(folders, out)], check=False)
    return out
