"""python -m utils.sweep FILE [--jobs N] [--executor local|slurm|dry] [--only REGEX] [--log_dir DIR] [--key value ...]

Runs a sweep file (exps/sweeps/*.json, or a name there: ``need``): every row checked first, each row's state read
from its run folder (finished: skipped; stopped: resumed; forking a parent not yet at its task: waiting), then
started on this machine, submitted to SLURM, or printed (dry); at the end, main.py --report over the finished
runs. Any ``--key value`` after the options is an override given to every new run. docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

from utils.sweep.command import main_args, shell
from utils.sweep.drive import Drive
from utils.sweep.fill import SweepError
from utils.sweep.plan import STARTABLE, Status, plan
from utils.sweep.spec import Sweep, available, environment, read_sweep


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.sweep", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a sweep file, or the name of one in exps/sweeps/ (" + ", ".join(sorted(available()))
                   + ")")
    p.add_argument("--executor", choices=("local", "slurm", "dry"), default="local",
                   help="local: runs here; slurm: jobs through submitit; dry: print the plan and the commands")
    p.add_argument("--jobs", type=int, help="runs at once (local: slots, one thread each; default 1) or the job "
                                            "array's limit (slurm: default 64)")
    p.add_argument("--only", default=".", metavar="REGEX", help="only the runs whose name (row_seed) matches")
    p.add_argument("--log_dir", default="logs", help="run folders: LOG_DIR/<row>_<seed>/<run folder>; console "
                                                     "logs LOG_DIR/<row>_<seed>.out (default logs)")
    p.add_argument("--seeds", type=int, nargs="+", help="the sweep's seeds (rows that fix their own keep them)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a variable of the file")
    p.add_argument("--env", action="store_true", help="variables the environment sets replace the file's (run.sh)")
    fork = p.add_mutually_exclusive_group()
    fork.add_argument("--fork", dest="fork", action="store_true", default=None,
                      help="rows with a parent fork its run at fork_task (the file's \"fork\" otherwise)")
    fork.add_argument("--no_fork", dest="fork", action="store_false", help="every row from scratch")
    p.add_argument("--python", default=sys.executable, help="the interpreter main.py runs with")
    p.add_argument("--progress_every", type=float, default=60.0, metavar="S", help="seconds between progress lines")
    p.add_argument("--poll", type=float, metavar="S", help="seconds between two looks at the runs (local 2, slurm 30)")
    p.add_argument("--no_report", dest="report", action="store_false", help="no main.py --report at the end")
    p.add_argument("--gpus", help="local: GPUs the slots use, e.g. 0,1 or none (default: CUDA_VISIBLE_DEVICES, "
                                  "else nvidia-smi)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="a SLURM parameter over the file's \"slurm\" (submitit's names: time, partition, "
                        "gpus_per_node, cpus_per_task, mem, account, qos, setup, ...)")
    p.add_argument("--children", choices=("poll", "afterok"), default="poll",
                   help="slurm: a forking run is submitted when its parent's task-K checkpoint exists (poll: the "
                        "sweep stays) or at once, after its parent's job (afterok: the sweep submits and exits)")
    return p


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE options into a dict; SweepError naming a malformed one."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"{flag} {item}: write {flag} NAME=VALUE")
        name, value = item.split("=", 1)
        out[name] = value
    return out


def sweep_path(name: str) -> Path:
    """A file, or a sweep's name in exps/sweeps/."""
    path = Path(name)
    if not path.exists() and path.suffix != ".json" and (Path("exps/sweeps") / f"{name}.json").is_file():
        return Path("exps/sweeps") / f"{name}.json"
    return path


def select(sweep: Sweep, only: str) -> list[str]:
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise SweepError(f"--only '{only}' is not a regular expression: {e}") from None
    return [r.id for r in sweep.runs if pattern.search(r.id)]


def dry(sweep: Sweep, selected: list[str], log_dir: Path, python: str) -> int:
    """Print each selected run's state and the command it would start with; run nothing."""
    steps = plan(sweep.runs, log_dir, set(selected))
    for rid in selected:
        s = steps[rid]
        if s.status in STARTABLE or s.status is Status.WAITING:
            parent = steps.get(s.run.parent) if s.run.parent else None
            args = main_args(s if s.status in STARTABLE else s.__class__(s.run, Status.READY, s.folder), log_dir,
                             sweep.extra, parent)
            note = f" {s.reason}" if s.reason else ""
            print(f"=== {rid} [{s.status.value}{note}]: {shell(python, args)}")
        else:
            print(f"=== {rid} [{s.status.value}]: {s.reason or s.folder.path}")
    counts: dict[str, int] = {}
    for rid in selected:
        counts[steps[rid].status.value] = counts.get(steps[rid].status.value, 0) + 1
    print(f"sweep {sweep.name} (dry): {len(selected)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def run(argv: Optional[list[str]] = None) -> int:
    """The command line; SweepError (and any bad input) is one line on stderr and exit 2."""
    args, rest = parser().parse_known_args(argv)
    from utils.config.reading import parse_overrides, parse_value
    from utils.config.schema import ConfigError
    try:
        try:
            extra = parse_overrides(rest)
        except ConfigError as e:
            raise SweepError(str(e)) from None
        for key, fix in (("seed", "the sweep's seeds are --seeds (run.sh: SEEDS)"), ("log_dir", "use --log_dir")):
            if key in extra:
                raise SweepError(f"override --{key}: each run has its own; {fix}")
        sweep = read_sweep(sweep_path(args.file), sets=pairs(args.set, "--set"),
                           env=environment() if args.env else None, seeds=args.seeds, fork=args.fork, extra=extra)
        selected = select(sweep, args.only)
        log_dir = Path(args.log_dir)
        if args.executor == "dry":
            return dry(sweep, selected, log_dir, args.python)
        if args.jobs is not None and args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: give 1 or more")
        if args.executor == "local":
            from utils.sweep.local import LocalLauncher, find_gpus
            jobs = args.jobs or 1
            launcher = LocalLauncher(jobs, args.python, log_dir, find_gpus(args.gpus),
                                     args.poll if args.poll is not None else 2.0, show=jobs == 1)
        else:
            from utils.sweep.slurm import SlurmLauncher, make_executor, submit_all
            jobs = args.jobs or 64
            options = {k: parse_value(v) for k, v in pairs(args.slurm, "--slurm").items()}
            launcher = SlurmLauncher(jobs, make_executor(sweep, log_dir.resolve(), jobs, options), sweep, log_dir,
                                     args.python, args.poll if args.poll is not None else 30.0)
        try:  # the last check: nothing is written before the options and every row have passed
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweepError(f"--log_dir '{log_dir}' cannot be made ({e.strerror or e}); choose another") from None
        if args.executor == "slurm" and args.children == "afterok":
            return submit_all(launcher, selected)
    except SweepError as e:
        print(f"error: sweep: {e}", file=sys.stderr)
        return 2
    print(f"sweep {sweep.name}: {len(selected)} of {len(sweep.runs)} runs selected, {args.executor}, "
          f"{jobs} at once, log_dir {log_dir}")
    return Drive(sweep, selected, launcher, log_dir, args.python, args.progress_every, args.report).run()


def main() -> None:
    sys.exit(run())
