"""Run a class-incremental experiment: python main.py --config=exps/sdlora_c100.json [--key value ...]

Wiring only: read and check the config, load the data, build the method, run every seed.
``--resume RUN_DIR`` continues an interrupted run from its last completed task.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from backbone.vit import BackboneError, check_backbone, check_backbone_inputs
from models import get_learner
from models.base import NonFiniteLoss
from utils import dist
from utils.dist import resolve_device
from utils.config import (Config, ConfigError, build_config, check_device, describe_keys, load_config,
                          parse_overrides)
from utils.data.data_manager import DataManager
from utils.data.datasets import DataError, load_dataset
from utils.data.data_manager import task_sizes
from utils.tracking import TrackingError, check_loggers
from utils.fork import check_fork, copy_prefix
from utils.io import CheckpointError, RunFolderBusy, RunLock, WriteError, new_run_dir, save_json
from utils.config.protocols import apply_protocol
from utils.run_folder import (RunFolderError, check_resumable, check_saved_paths, read_config, read_metrics,
                              resolve_paths)
from utils.run_folder import check_writable as check_folder_writable

#: Exit codes: 0 done, 2 bad input (config, data, weights, checkpoint), 3 NaN/inf loss, 74 a write failed,
#: 75 the run folder is busy, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, sent before preemption).
EXIT_TERMINATED = 143
EXIT_WRITE_FAILED = 74  # sysexits EX_IOERR: a file could not be written (full disk, lost mount)
EXIT_BUSY = 75          # sysexits EX_TEMPFAIL: the run folder is held by a process still training it


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C, with the completed tasks saved. A BaseException, as KeyboardInterrupt
    is, so no ``except Exception`` on the way (logging's emit, a data loader) can swallow it."""


def _on_sigterm(signum, frame):
    raise Terminated()


#: Said at the end of a run on a random-init backbone (the demo), whose numbers mean nothing about the methods.
RANDOM_INIT_NOTE = ("Note: this backbone is random-init (\"pretrained\": false), so these numbers only show that the "
                    "pipeline runs end to end, not what the method can do. Real numbers: a pretrained ViT on real "
                    "data, e.g. python main.py --config=exps/sdlora_c100.json (downloads), or offline "
                    "--protocol exps/protocols/quick.json (README, 'Real experiments').")

#: The run folder in progress, for the message that says how to resume it.
CURRENT_RUN: list[Path] = []

#: Keys a resumed run may change: they do not alter the experiment.
RESUME_KEYS = {"max_tasks", "num_workers", "progress", "device"}

#: Bad input (exit 2): a key, a file, data, weights, a checkpoint or a run folder; found before any training.
INPUT_ERRORS = (ConfigError, DataError, BackboneError, CheckpointError, TrackingError, RunFolderError)


def check_writable(log_dir: str) -> None:
    """The run folders' parent must take files: find out now, not after the first task has trained."""
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as e:
        raise ConfigError(f"config key 'log_dir' = '{log_dir}' is not writable ({e.strerror or e}); "
                          "choose another folder") from None


def check_distributed(cfg: Config) -> None:
    """What torchrun needs: the same images on every rank as in one process, and a divisible batch."""
    n = dist.world()
    if n == 1:
        return
    if not cfg.seed_per_sample:
        raise ConfigError("torchrun runs need \"seed_per_sample\": true (each image's order and augmentation drawn "
                          "from its own seed, the same whichever process loads it); add --seed_per_sample true")
    if cfg.batch_size % n:
        raise ConfigError(f"config key 'batch_size' = {cfg.batch_size} is the global batch; it must divide by the "
                          f"{n} torchrun processes")


def setup_logging(run_dir: Path) -> None:
    """INFO to stdout and run_dir/train.log; under torchrun, ranks other than 0 only print warnings."""
    logger = logging.getLogger("cl")
    logger.setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)] + ([logging.FileHandler(run_dir / "train.log")] if dist.is_main()
                                                      else [])
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


make_data_manager = DataManager.for_config  # the name tests and scripts know


def discard(run_dir: Path) -> None:
    """Remove a run folder this process made a moment ago and trained nothing in (its setup was refused)."""
    logger = logging.getLogger("cl")
    for h in logger.handlers:
        h.close()
    logger.handlers.clear()
    if dist.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
    CURRENT_RUN.clear()


def check_backbone_of(cfg: Config) -> None:
    """Build the backbone once before any run folder exists: an unknown backbone_type, backbone_kwargs timm
    refuses, or a pretrained_path that is missing, not a weights file or of another architecture stop here."""
    check_backbone(cfg.backbone_type, cfg.pretrained, cfg.pretrained_path, cfg.img_size, cfg.backbone_kwargs)


def run_seed(cfg: Config, seed: int, data, device: torch.device) -> Path:
    """One seed of an experiment in a fresh run folder; returns the folder."""
    run_dir = new_run_dir(cfg.log_dir, f"{cfg.prefix}_{cfg.dataset}_{cfg.model_name}_{seed}")
    lock = RunLock(run_dir).acquire()
    try:
        return _train_new(cfg, seed, data, device, run_dir)
    finally:
        lock.release()


def _train_new(cfg: Config, seed: int, data, device: torch.device, run_dir: Path) -> Path:
    CURRENT_RUN[:] = [run_dir]
    save_json(run_dir / "config.json", dict(cfg.to_dict(), seed=seed))
    setup_logging(run_dir)
    log = logging.getLogger("cl")
    log.info(f"Run folder: {run_dir}")
    log.info("Config: " + json.dumps(dict(cfg.to_dict(), seed=seed)))
    try:  # what the checks before the folder did not catch: the folder goes, nothing was trained in it
        dm = make_data_manager(cfg, data, seed)
        log.info(f"Class order: {dm.order.tolist()}")
        learner = get_learner(cfg.model_name)(cfg, device, run_dir, seed)
    except INPUT_ERRORS:
        discard(run_dir)
        raise
    learner.run(dm)
    log.info(f"Done: {learner.headline()}; results in {run_dir}")
    if not cfg.pretrained:
        log.info(RANDOM_INIT_NOTE)
    return run_dir


def saved_config(run_dir: Path, raw: dict) -> Config:
    """A run folder's config.json checked as a config; an error names the file."""
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"'{run_dir / 'config.json'}' no longer reads as a config: {e}") from None


def resume(run_dir: Path, overrides: dict) -> Path:
    """Continue a run folder after its last completed task (checkpoints and metrics.json).

    Everything is checked before the first write: the config, the folder's files against each other, that the
    folder takes files, the data, the backbone and the checkpoints (loaded into the model)."""
    bad = sorted(set(overrides) - RESUME_KEYS)
    if bad:
        raise ConfigError(f"--resume cannot change {bad}: they alter the experiment; allowed: {sorted(RESUME_KEYS)} "
                          "(to train on under other keys: --fork_from RUN_DIR --fork_task K --key value)")
    raw = read_config(run_dir, "--resume")
    check_saved_paths(raw, run_dir)
    cfg = saved_config(run_dir, dict(raw, **overrides))
    device = resolve_device(cfg.device)
    dist.init(device.type)  # before anything below asks which rank it is
    check_distributed(cfg)
    check_device(cfg, device.type)
    check_loggers(cfg.loggers)
    if dist.is_main():
        check_folder_writable(run_dir)  # found now, not when the first task's checkpoint is written
    lock = RunLock(run_dir).acquire()  # before the folder's files are read: no process is writing them
    try:
        metrics = read_metrics(run_dir)
        done = check_resumable(run_dir, cfg, metrics)
        return _continue(run_dir, cfg, device, metrics, done)
    finally:
        lock.release()


def fork(parent: Path, k: int, config: str | None, overrides: dict) -> Path:
    """A new run folder with the parent's tasks 0..k-1 (copied, the parent untouched), trained on from task k
    under the new config: ``config`` (or the parent's config.json) with the overrides (utils/fork.py)."""
    parent_raw = read_config(parent, "--fork_from")
    parent_cfg = resolve_paths(saved_config(parent, parent_raw))
    if config is not None:
        cfg = load_config(config, overrides)
    else:  # the parent's resolved keys; a protocol given now is laid over them
        cfg = build_config(apply_protocol(parent_raw, overrides) if "protocol" in overrides
                           else dict(parent_raw, **overrides))
    cfg = resolve_paths(cfg)
    if not getattr(get_learner(cfg.model_name), "forkable", True):
        raise ConfigError(f"model_name '{cfg.model_name}' keeps only its latest statistics, not each task's: its runs "
                          "resume (--resume) but cannot fork")
    check_fork(parent, parent_cfg, cfg, k)
    device = resolve_device(cfg.device)
    dist.init(device.type)
    check_distributed(cfg)
    check_device(cfg, device.type)
    check_loggers(cfg.loggers)
    check_backbone_inputs(cfg.backbone_type, cfg.pretrained, cfg.pretrained_path)
    make_data_manager(cfg, load_dataset(cfg), cfg.seeds[0])  # data that cannot be split stops here
    check_backbone_of(cfg)
    check_writable(cfg.log_dir)
    seed = cfg.seeds[0]
    run_dir = new_run_dir(cfg.log_dir, f"{cfg.prefix}_{cfg.dataset}_{cfg.model_name}_{seed}")
    lock = RunLock(run_dir).acquire()
    try:
        save_json(run_dir / "config.json", dict(cfg.to_dict(), seed=seed))
        copied = copy_prefix(parent, run_dir, k, parent_raw)
        setup_logging(run_dir)
        logging.getLogger("cl").info(f"Run folder: {run_dir}, forked from {parent} at task {k} "
                                     f"({len(copied)} files of tasks 0..{k - 1} copied; fork.json)")
        try:  # refused before any task trained (checkpoints that do not fit, data): the copy goes
            metrics = read_metrics(run_dir)
            done = check_resumable(run_dir, cfg, metrics)
            state = _prepare(run_dir, cfg, device, metrics, done)
        except INPUT_ERRORS:
            discard(run_dir)
            raise
        return _train_on(run_dir, cfg, state, done)
    finally:
        lock.release()


def _continue(run_dir: Path, cfg: Config, device: torch.device, metrics: dict | None, done: int) -> Path:
    """Train a checked folder on from task ``done`` (the number of tasks metrics.json lists)."""
    return _train_on(run_dir, cfg, _prepare(run_dir, cfg, device, metrics, done), done)


def _prepare(run_dir: Path, cfg: Config, device: torch.device, metrics: dict | None, done: int):
    """The learner restored after task done - 1 (None when every task is done) and the data; nothing is
    written (an error here leaves the folder as it was)."""
    CURRENT_RUN[:] = [run_dir]
    seed = cfg.seeds[0]
    data = load_dataset(cfg)
    dm = make_data_manager(cfg, data, seed)
    every = len(task_sizes(data.n_classes, cfg.init_cls, cfg.increment))
    if done > every:
        raise RunFolderError(f"'{run_dir / 'metrics.json'}' lists {done} tasks, but its config.json makes {every}: "
                             "the file is another run's; restore the run's own metrics.json")
    if done >= dm.n_tasks:
        return None, dm
    learner = get_learner(cfg.model_name)(cfg, device, run_dir, seed)
    if done > 0:
        learner.restore(dm, done - 1)  # CheckpointError when they do not fit config.json
        learner.load_metrics(metrics)
    return learner, dm


def _train_on(run_dir: Path, cfg: Config, state, done: int) -> Path:
    setup_logging(run_dir)  # from here on the folder is written: every check has passed
    log = logging.getLogger("cl")
    learner, dm = state
    if learner is None:
        log.info(f"{run_dir}: all {dm.n_tasks} tasks are already done")
        return run_dir
    for stale in run_dir.glob(".*.tmp") if dist.is_main() else []:  # an atomic write cut off by SIGKILL
        stale.unlink()
        log.info(f"removed {stale.name}, a temporary file left by the interrupted run")
    log.info(f"Resuming {run_dir} at task {done}/{dm.n_tasks}")
    learner.run(dm, start=done)
    log.info(f"Done: {learner.headline()}; results in {run_dir}")  # as a new run ends (the sweep reads the run folder)
    if not cfg.pretrained:
        log.info(RANDOM_INIT_NOTE)
    return run_dir


def _refuse(message: str) -> int:
    """Bad input: the message (naming the key or file and the fix) on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The command line; SIGTERM is handled like Ctrl-C for as long as it runs."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.shutdown()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be overridden: --epochs 1 --pretrained false "
                                            "--lora_targets '[\"q\",\"v\"]' (values are read as JSON).")
    parser.add_argument("--config", help="JSON config file (see exps/)")
    parser.add_argument("--protocol", help="a protocol file (exps/protocols/): data subset, image size, epochs, ... "
                                           "laid over the config, under the --key overrides")
    parser.add_argument("--resume", help="run folder to continue after its last completed task")
    parser.add_argument("--fork_from", metavar="RUN_DIR", help="a new run that keeps this run's first --fork_task "
                                                               "tasks and trains the rest under --config / overrides")
    parser.add_argument("--fork_task", type=int, metavar="K",
                        help="with --fork_from: tasks 0..K-1 come from the parent")
    parser.add_argument("--keys", action="store_true", help="list every config key with its default and exit")
    parser.add_argument("--report", nargs="+", metavar="RUN_DIR",
                        help="figures (RUN_DIR/plots/) and tables of runs; with several, a comparison and the mean "
                             "± std over seeds of the finished runs")
    parser.add_argument("--report_out", metavar="DIR", help="where --report puts the comparison and tables "
                                                             "of several runs (default: report/ beside the first)")
    parser.add_argument("--include_unfinished", action="store_true",
                        help="with --report: runs that stopped before their last task go into the mean ± std too "
                             "(averaged only with runs of as many tasks)")
    args, rest = parser.parse_known_args(argv)
    if args.keys:
        print(describe_keys())
        return 0
    given = [f for f, v in (("--config", args.config), ("--protocol", args.protocol), ("--resume", args.resume),
                            ("--fork_from", args.fork_from), ("--fork_task", args.fork_task is not None),
                            ("--report", args.report)) if v]
    if args.report:
        if len(given) > 1 or rest:  # a mistyped flag is not silently dropped
            return _refuse("--report reads run folders only: it takes no "
                           f"{', '.join([g for g in given if g != '--report'] + rest[:3])} "
                           "(--report RUN_DIR ... [--report_out DIR] [--include_unfinished])")
        from utils.report import ReportError, report  # matplotlib only where reports are made
        try:
            print(report(args.report, args.report_out, args.include_unfinished))
        except ReportError as e:
            return _refuse(str(e))
        return 0
    if args.report_out or args.include_unfinished:
        return _refuse("--report_out and --include_unfinished go with --report RUN_DIR ...")
    if args.resume and len(given) > 1:
        return _refuse("--resume continues a run under its own config.json; it takes no "
                       f"{', '.join(g for g in given if g != '--resume')} "
                       "(to train on under another config: --fork_from RUN_DIR --fork_task K --config FILE)")
    try:
        overrides = parse_overrides(rest)
        if args.protocol:
            overrides["protocol"] = args.protocol
        if args.resume:
            resume(Path(args.resume), overrides)
            return 0
        if (args.fork_from is None) != (args.fork_task is None):
            parser.error("--fork_from RUN_DIR and --fork_task K go together")
        if args.fork_from:
            fork(Path(args.fork_from), args.fork_task, args.config, overrides)
            return 0
        if not args.config:
            parser.error("--config is required (for example --config=exps/demo.json)")
        cfg = resolve_paths(load_config(args.config, overrides))  # config.json names its files from any directory
        twice = sorted({s for s in cfg.seeds if cfg.seeds.count(s) > 1})
        if twice:
            raise ConfigError(f"config key 'seed' = {json.dumps(cfg.seed)} lists seed(s) {twice} more than once: the "
                              "same run twice, not another seed; list each seed once")
        device = resolve_device(cfg.device)
        dist.init(device.type)
        check_distributed(cfg)
        check_device(cfg, device.type)  # before any work: no run folder yet
        check_loggers(cfg.loggers)
        check_backbone_inputs(cfg.backbone_type, cfg.pretrained, cfg.pretrained_path)  # quick: name, weights file
        data = load_dataset(cfg)
        for seed in cfg.seeds:  # task splits that cannot be made stop here, not after a run folder exists
            make_data_manager(cfg, data, seed)
        check_backbone_of(cfg)  # the whole backbone, weights loaded (a download from the hub, once)
        check_writable(cfg.log_dir)  # the last check: it makes log_dir if there is none
        for seed in cfg.seeds:
            run_seed(replace(cfg, seed=seed), seed, data, device)
    except INPUT_ERRORS as e:
        return _refuse(str(e))
    except (KeyboardInterrupt, Terminated) as e:
        term = isinstance(e, Terminated)
        where = str(CURRENT_RUN[0]) if CURRENT_RUN else "RUN_DIR"
        print(f"\n{'terminated (SIGTERM)' if term else 'interrupted'}: completed tasks are saved; continue "
              f"with python main.py --resume {where}", file=sys.stderr)
        return EXIT_TERMINATED if term else 130
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except RunFolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    return 0


if __name__ == "__main__":
    sys.exit(main())
