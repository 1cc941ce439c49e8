"""The SLURM executor, through submitit (an optional extra: ``pip install -e ".[cluster]"``; imported only here).

Startable runs go to the cluster as one job array per round, at most ``--jobs`` at once (the array's ``%`` limit).
Each array task is a ``RowJob``: on the node it reads its run's folder again and runs main.py as a new run, a
fork or a ``--resume``; when SLURM warns of preemption or the time limit (USR2), it stops main.py (SIGTERM: the
finished tasks are saved) and submitit requeues it, and the requeued job resumes the folder. A run that forks
its parent at task K is submitted once the parent's folder lists K tasks (``--children poll``: the sweep stays
and watches), or at once with ``--dependency=afterok:<parent job>`` (``--children afterok``: the sweep submits
and exits). Job ids go to LOG_DIR/.slurm_jobs.json, so a second sweep follows queued jobs instead of
submitting them twice.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from utils.sweep.command import MAIN, main_args
from utils.sweep.fill import SweepError
from utils.sweep.plan import STARTABLE, Status, Step, console_log, plan, read_folder, run_dir
from utils.sweep.spec import Run, Sweep

#: sacct states of a job that has not ended (submitit's list): it is followed, not submitted again.
LIVE = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING",
        "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}


def submitit():
    """The submitit module, or a SweepError saying how to install it."""
    try:
        import submitit as module
    except ImportError:
        raise SweepError('--executor slurm needs submitit: pip install -e ".[cluster]" (or pip install submitit)') \
            from None
    return module


@dataclass
class RowJob:
    """What one SLURM job runs: a run of the sweep, planned again from its folder when the job starts."""
    run: Run
    parent: Optional[Run]
    log_dir: str
    python: str
    cwd: str
    extra: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        """main.py's arguments now: a new run, a fork of the parent's folder, or --resume of a stopped folder."""
        runs = [self.parent, self.run] if self.parent else [self.run]
        steps = plan(runs, Path(self.log_dir), {r.id for r in runs})
        step = steps[self.run.id]
        if step.status not in STARTABLE:
            raise RuntimeError(f"{self.run.id} cannot start: {step.status.value} {step.reason}".strip())
        return main_args(step, Path(self.log_dir), self.extra, steps.get(self.parent.id) if self.parent else None)

    def __call__(self) -> str:
        folder = read_folder(run_dir(Path(self.log_dir), self.run))
        if folder.finished:
            return str(folder.path)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        with open(console_log(Path(self.log_dir), self.run), "a") as log:
            self._proc = subprocess.Popen([self.python, str(MAIN), *self.command()], cwd=self.cwd, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            code = self._proc.wait()
        if code != 0:
            raise RuntimeError(f"{self.run.id}: main.py exited {code}; its output: "
                               f"{console_log(Path(self.log_dir), self.run)}")
        return str(read_folder(run_dir(Path(self.log_dir), self.run)).path)

    def checkpoint(self) -> Any:
        """Preemption or the time limit: stop main.py (it saves what is finished), then requeue this job, which
        resumes the run folder (submitit calls this on USR2)."""
        proc = getattr(self, "_proc", None)
        if proc is not None:
            stop(proc)
        return submitit().helpers.DelayedSubmission(RowJob(**{f.name: getattr(self, f.name) for f in fields(self)}))

    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to main.py, SIGKILL after ``grace`` seconds. It waits with waitid(WNOWAIT), not proc.wait(): this
    runs in submitit's signal handler, which interrupts the job's own proc.wait() while that holds Popen's lock."""
    if proc.returncode is not None:
        return
    proc.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:  # already reaped
            return
        time.sleep(0.1)
    proc.kill()


#: What a job gets unless the sweep file or --slurm says otherwise: 12 hours (submitit's default is 5 minutes), and
#: up to 10 requeues after the time limit, each resuming the run folder.
DEFAULTS = {"time": 720, "max_num_timeout": 10}


def make_executor(sweep: Sweep, log_dir: Path, jobs: int, options: dict) -> Any:
    """A submitit SlurmExecutor with the sweep's resources ("slurm" in the file), the command line's on top, an
    array limit of ``jobs``; SweepError for a parameter submitit does not know, or no srun."""
    module = submitit()
    params = dict(DEFAULTS, job_name=f"sweep_{sweep.name}")
    params.update(sweep.slurm)
    params.update(options)
    params["array_parallelism"] = jobs
    timeouts = params.pop("max_num_timeout")
    try:
        executor = module.SlurmExecutor(folder=log_dir / ".submitit" / "%j", max_num_timeout=int(timeouts))
        executor.update_parameters(**params)
    except (RuntimeError, ValueError) as e:
        raise SweepError(f"--executor slurm: {str(e).splitlines()[0]}") from None
    return executor


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Jobs' states as sacct says them (one call, through submitit's watcher), each its first word: PENDING,
    RUNNING, COMPLETED, FAILED, ...; UNKNOWN for a job sacct does not list yet."""
    watcher = submitit().slurm.slurm.SlurmJob.watcher
    for jid in job_ids:
        watcher.register_job(jid)
    watcher.update()
    return {jid: (watcher.get_state(jid, mode="cache") or "UNKNOWN").split()[0] for jid in job_ids}


@dataclass
class SlurmLauncher:
    """Submits runs as job arrays and follows them with sacct; the sweep's job ids are kept in a record file."""
    slots: int
    executor: Any
    sweep: Sweep
    log_dir: Path
    python: str
    wait_s: float = 30.0
    say: Callable[[str], None] = print
    jobs: dict[str, str] = field(default_factory=dict)   # run id -> job id, for jobs not yet seen to end

    def __post_init__(self) -> None:
        record = {rid: jid for rid, jid in read_record(self.log_dir).items() if rid in self.sweep.by_id()}
        states = job_states(list(record.values()))
        self.jobs = {rid: jid for rid, jid in record.items() if states[jid] in LIVE}
        for rid, jid in self.jobs.items():
            self.say(f"=== {rid}: job {jid} is in the queue (submitted before): followed, not submitted again")

    def row_job(self, run: Run) -> RowJob:
        parent = self.sweep.by_id()[run.parent] if run.parent else None
        return RowJob(run, parent, str(self.log_dir.resolve()), self.python, str(Path.cwd()), self.sweep.extra)

    def submit(self, runs: list[Run], dependency: Optional[str] = None) -> list[str]:
        """One submission (a job array when there are several runs); the job ids, also kept in the record."""
        before = dict(self.executor.parameters)
        if dependency:  # a parent job that fails cancels its children, rather than leave them pending for ever
            extra = dict(before.get("additional_parameters") or {}, **{"kill-on-invalid-dep": "yes"})
            self.executor.update_parameters(dependency=dependency, additional_parameters=extra)
        try:
            with self.executor.batch():
                submitted = [self.executor.submit(self.row_job(r)) for r in runs]
        finally:
            self.executor.parameters.clear()
            self.executor.parameters.update(before)
        ids = [j.job_id for j in submitted]
        self.jobs.update({r.id: jid for r, jid in zip(runs, ids)})
        write_record(self.log_dir, dict(read_record(self.log_dir), **{r.id: jid for r, jid in zip(runs, ids)}))
        after = f" after {dependency}" if dependency else ""
        self.say(f"submitted {len(ids)} job(s) {ids[0].split('_')[0]}{after}: {', '.join(r.id for r in runs)}")
        return ids

    def start(self, launches: list[tuple[Step, list[str]]]) -> None:
        self.submit([s.run for s, _ in launches])

    def poll(self) -> dict[str, int]:
        ended = {}
        states = job_states(list(self.jobs.values()))
        for rid, jid in list(self.jobs.items()):
            state = states[jid]
            if state not in LIVE:
                ended[rid] = 0 if state == "COMPLETED" else 1
                del self.jobs[rid]
                if state != "COMPLETED":
                    self.say(f"=== {rid}: job {jid} ended {state}")
        return ended

    def active(self) -> frozenset[str]:
        return frozenset(self.jobs)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def stop(self, signum: int) -> None:
        self.say(f"the {len(self.jobs)} submitted job(s) stay in the queue ({', '.join(self.jobs.values())}); run "
                 "the sweep again to follow them, or scancel them")


def record_path(log_dir: Path) -> Path:
    return Path(log_dir) / ".slurm_jobs.json"


def read_record(log_dir: Path) -> dict[str, str]:
    """Run id -> job id of the jobs sweeps submitted into this log_dir."""
    path = record_path(log_dir)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_record(log_dir: Path, record: dict[str, str]) -> None:
    from utils.io import save_json
    save_json(record_path(log_dir), record)


def submit_all(launcher: SlurmLauncher, selected: list[str]) -> int:
    """``--children afterok``: submit every startable run now as one array, then each run that forks a parent
    with a dependency on its parent's job (children of one parent job as one array); returns the exit code."""
    steps = plan(launcher.sweep.runs, launcher.log_dir, set(selected), launcher.active())
    first = [steps[i].run for i in selected if steps[i].status in STARTABLE]
    if first:
        launcher.submit(first)
    while True:
        groups: dict[str, list[Run]] = {}
        for rid in selected:
            s = steps[rid]
            if s.status is Status.WAITING and rid not in launcher.jobs and s.run.parent in launcher.jobs:
                groups.setdefault(launcher.jobs[s.run.parent], []).append(s.run)
        if not groups:
            break
        for parent_job, runs in groups.items():
            launcher.submit(runs, dependency=f"afterok:{parent_job}")
    for rid in selected:
        s = steps[rid]
        if rid not in launcher.jobs and s.status is not Status.DONE:
            launcher.say(f"=== {rid}: not submitted: {s.status.value} {s.reason}".rstrip())
    launcher.say("submitted; run the same command again to see where the runs are (finished runs are skipped, "
                 "queued jobs followed) and, once all have ended, for the report")
    return 0

