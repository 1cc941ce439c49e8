"""Cost against the task index on a long stream (issue 42), measured in one process, as ratios to t = 1 and t = 10.

    python benchmarks/long_stream.py                                  # 50 tasks of 2 classes, t = 1 10 25 50
    python benchmarks/long_stream.py --tasks 1 10 25 50 --model vit_small_patch14_dinov2 --backbone_kwargs '{}'
    python benchmarks/long_stream.py --device cuda --model vit_base_patch16_224 --img_size 224 --batch 128

A real run first: the method config (default exps/sdlora_c100.json, SD-LoRA) on a random-init ViT and generated
images, max(--tasks) tasks of --classes_per_task classes, one epoch each, driven through the Learner's own task loop
(``Learner._run_task``: train, evaluate, checkpoint, metrics.json). From it, per task t:

  peak memory     metrics.json's peak_memory_mb: on the CPU the process's resident high-water mark over the task
                  (reset at its start), on a GPU CUDA's max_memory_allocated over the task
  bytes written   what the task wrote to the run folder: new or replaced files whole (task_t.safetensors, the
                  metrics.json rewrite, head state), appended bytes of train.log
  train / eval    the run's own train_seconds per step and eval_seconds per test image (one measure each)

Then, side by side in interleaved rounds (the median is printed), for each t of --tasks:

  train step      the learner restored after t - 1 tasks, task t - 1 begun (t adapters: t - 1 frozen and the
                  current one), one epoch of ``Learner.fit`` on its training images, per optimiser step
  eval / image    ``Learner.evaluate`` after task t - 1 (adapters merged once, as every evaluation does), per
                  test image (2 t classes' images)
  resume          what ``main.py --resume`` does before training on a copy of the folder with t tasks done:
                  read config.json and metrics.json, check every checkpoint, load the data, build and restore
                  the learner (and, apart, the restore alone)
  step tensors    the bytes a training step holds (parameters, buffers, gradients, the tensors autograd saves;
                  unique storages, as benchmarks/adapters.py counts them): exact for what grows with t

The default model is the quick protocol's step shape (ViT-S/14 width 384, 70 px: 26 tokens, batch 20, rank 10)
cut to 4 blocks: every block costs the same, so the per-block ratios are the 12-block model's, at a third of the
time. The bar of issue 42: at t = 50 the training step and the peak memory within 1.10x of t = 10.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.adapters import SavedBytes  # noqa: E402
from models import get_learner  # noqa: E402
from models.base import Learner, seed_everything, task_seed  # noqa: E402
from utils.config import Config, load_config  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402
from utils.dist import resolve_device  # noqa: E402
from utils.io import new_run_dir, save_json  # noqa: E402

#: The bar of issue 42: the training step and the peak memory at the last t within this factor of t = BAR_REF.
BAR, BAR_REF = 1.10, 10


@dataclass
class Row:
    """Every figure measured at one task count t."""
    t: int
    peak_mb: Optional[float] = None
    written: dict[str, int] = field(default_factory=dict)  # file kind -> bytes the task wrote
    run_step_s: float = 0.0        # the real run's train_seconds / train_steps of task t - 1
    run_eval_s: float = 0.0        # the real run's eval_seconds / test images of task t - 1
    step_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    resume_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    step_tensor_mb: float = 0.0


def build_cfg(args, log_dir: Path) -> Config:
    """The method config on generated data: max(--tasks) tasks to run, one more in the stream (so that a folder
    with every task done still has one to resume into)."""
    n = max(args.tasks)
    over = dict(dataset="synthetic", synthetic_classes=args.classes_per_task * (n + 1), init_cls=args.classes_per_task,
                increment=args.classes_per_task, max_tasks=n, train_per_class=args.train_per_class,
                test_per_class=args.test_per_class, backbone_type=args.model, pretrained=False, pretrained_path=None,
                img_size=args.img_size, backbone_kwargs=args.backbone_kwargs, batch_size=args.batch, epochs=1,
                init_epoch=None, device=args.device, num_workers=0, progress=False, loggers=[], log_dir=str(log_dir),
                seed=1993, amp=args.amp)
    if args.rank is not None:
        over["lora_rank"] = args.rank
    return load_config(args.config, over)


def folder_state(run_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Each file's (inode, size, mtime) in the run folder."""
    out = {}
    for f in run_dir.iterdir():
        if f.is_file():
            st = f.stat()
            out[f.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def file_kind(name: str) -> str:
    """What a run-folder file is, for the bytes-written breakdown."""
    if name.startswith("task_") and name.endswith(".safetensors"):
        return "checkpoint"
    if name.startswith("head_task_"):
        return "head"
    if name in ("metrics.json", "train.log"):
        return name
    return "other"


def bytes_written(before: dict, after: dict) -> dict[str, int]:
    """Bytes a task wrote, by file kind: a new or replaced file (atomic writes rename a new inode) whole, a file
    appended to by what it grew."""
    out: dict[str, int] = {}
    for name, (ino, size, mtime) in after.items():
        old = before.get(name)
        if old is None or old[0] != ino:
            n = size
        elif old[2] != mtime:
            n = size - old[1] if size >= old[1] else size  # appended, or cut and written again
        else:
            continue
        out[file_kind(name)] = out.get(file_kind(name), 0) + n
    return out


def run_stream(cfg: Config, dm: DataManager, device: torch.device, rows: dict[int, Row],
               snapshots: Path) -> Path:
    """The real run, task by task through the learner's task loop; a copy of the folder after each t of ``rows``."""
    seed = cfg.seeds[0]
    run_dir = new_run_dir(cfg.log_dir, f"{cfg.prefix}_{cfg.dataset}_{cfg.model_name}_{seed}")
    save_json(run_dir / "config.json", dict(cfg.to_dict(), seed=seed))
    logger = logging.getLogger("cl")  # train.log, as main.py writes it (not echoed here)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    learner = get_learner(cfg.model_name)(cfg, device, run_dir, seed)
    learner.book.tasks_planned = dm.n_tasks
    try:
        for task in range(dm.n_tasks):
            before = folder_state(run_dir)
            learner._run_task(dm, task)  # the body of Learner.run's loop
            t = task + 1
            if t in rows:
                m = learner.metrics
                rows[t].written = bytes_written(before, folder_state(run_dir))
                rows[t].peak_mb = m["peak_memory_mb"][task]
                rows[t].run_step_s = m["train_seconds"][task] / max(m["train_steps"][task], 1)
                rows[t].run_eval_s = m["eval_seconds"][task] / len(dm.test_set(task, learner.test_tf))
                shutil.copytree(run_dir, snapshots / str(t), ignore=shutil.ignore_patterns(".lock"))
            print(f"  task {t}/{dm.n_tasks} done", end="\r", flush=True)
    finally:
        learner.tracker.close()
        logger.removeHandler(handler)
        handler.close()
    print()
    if learner.peak_memory.unavailable:
        print(f"# peak memory per task not measured: {learner.peak_memory.unavailable}")
    return run_dir


def at_task(cfg: Config, dm: DataManager, device: torch.device, run_dir: Path, t: int) -> Learner:
    """A learner restored after t - 1 tasks of ``run_dir`` with task t - 1 begun (t adapters), as _run_task
    begins a task; it writes nothing."""
    learner = get_learner(cfg.model_name)(cfg, device, run_dir, cfg.seeds[0])
    task = t - 1
    if task:
        learner.restore(dm, task - 1)
    seed_everything(task_seed(cfg.seeds[0], task))
    lo, hi = dm.task_range(task)
    learner.n_new = hi - lo
    learner.begin_task(task, hi - lo)
    learner.task_steps = 0
    return learner


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so that a clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def step_tensor_mb(learner: Learner, loader, task: int) -> float:
    """What one training step holds (benchmarks/adapters.py's count): parameters, buffers, the tensors autograd
    saves (unique storages) and the gradients of what trains."""
    x, y = next(iter(loader))
    x, y = x.to(learner.device), y.to(learner.device)
    saved = SavedBytes()
    learner.net.train()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        with learner._autocast():
            loss = learner.task_loss(learner.net(x).float(), y, task, learner.net.head.out_features - learner.n_new)
    del loss
    for t in list(learner.net.parameters()) + list(learner.net.buffers()):
        saved.pack(t)
    grads = sum(p.numel() * p.element_size() for p in learner.net.parameters() if p.requires_grad)
    return (grads + saved.total) / 2 ** 20


def time_steps_and_eval(cfg: Config, dm: DataManager, device: torch.device, run_dir: Path, rows: dict[int, Row],
                        repeats: int) -> None:
    """Training steps and evaluations at every t, interleaved round after round (one warm-up round first)."""
    learners = {t: at_task(cfg, dm, device, run_dir, t) for t in rows}
    loaders = {t: learners[t].train_loader(dm, t - 1) for t in rows}
    for t, r in rows.items():
        r.step_tensor_mb = step_tensor_mb(learners[t], loaders[t], t - 1)
    n_test = {t: len(dm.test_set(t - 1, learners[t].test_tf)) for t in rows}
    for rnd in range(repeats + 1):
        for t, r in rows.items():
            lr = learners[t]
            lr.task_steps = 0
            s = timed(lambda: lr.fit(t - 1, loaders[t], lr.param_groups(), 1, desc=f"Task {t - 1}"), device)
            e = timed(lambda: lr.evaluate(dm, t - 1), device)
            if rnd:  # round 0 warms up
                r.step_s.append(s / max(lr.task_steps, 1))
                r.eval_s.append(e / n_test[t])


def time_resume(cfg: Config, device: torch.device, snapshots: Path, rows: dict[int, Row], repeats: int) -> None:
    """``main.py --resume SNAPSHOT --max_tasks N+1`` up to the first task it would train, interleaved over t."""
    import main as cli
    from utils.run_folder import check_resumable, read_config, read_metrics
    for _ in range(repeats):
        for t, r in rows.items():
            folder = snapshots / str(t)
            t0 = time.perf_counter()
            raw = read_config(folder, "--resume")
            rcfg = cli.saved_config(folder, dict(raw, max_tasks=cfg.max_tasks + 1, device=cfg.device))
            metrics = read_metrics(folder)
            done = check_resumable(folder, rcfg, metrics)
            learner, dm = cli._prepare(folder, rcfg, device, metrics, done)
            sync(device)
            r.resume_s.append(time.perf_counter() - t0)
            if learner is None or done != t:
                raise RuntimeError(f"'{folder}' resumed after {done} tasks, not {t}: the copy is not the run's")
            fresh = get_learner(rcfg.model_name)(rcfg, device, folder, rcfg.seeds[0])
            r.restore_s.append(timed(lambda: fresh.restore(dm, done - 1), device))


def ratio_cells(values: dict[int, float], t: int, ref: Optional[int]) -> str:
    """The value at t over t = the first and over t = ref, as table cells."""
    first = values[min(values)]
    a = f"{values[t] / first:7.3f}" if first else "      -"
    b = f"{values[t] / values[ref]:7.3f}" if ref in values and values[ref] else "      -"
    return f"{a} {b}"


def report(rows: dict[int, Row], device: torch.device) -> None:
    """Print every figure with its ratios to the first t and to t = 10, then the bar with PASS / FAIL."""
    ts = sorted(rows)
    ref = BAR_REF if BAR_REF in rows else None
    first = ts[0]
    peak_kind = "CUDA max allocated" if device.type == "cuda" else "RSS high-water"
    written = {t: sum(rows[t].written.values()) for t in ts}
    measures = [
        ("train step (ms, median)", {t: 1000 * statistics.median(rows[t].step_s) for t in ts}),
        ("eval per test image (ms, median)", {t: 1000 * statistics.median(rows[t].eval_s) for t in ts}),
        (f"peak memory over the task (MB, {peak_kind})",
         {t: rows[t].peak_mb for t in ts if rows[t].peak_mb is not None}),
        ("training step tensors (MB)", {t: rows[t].step_tensor_mb for t in ts}),
        ("bytes written by the task (kB)", {t: written[t] / 1000 for t in ts}),
        ("resume, as --resume (s, median)", {t: statistics.median(rows[t].resume_s) for t in ts}),
        ("  of which restore (s, median)", {t: statistics.median(rows[t].restore_s) for t in ts}),
        ("the run's train step (ms, one measure)", {t: 1000 * rows[t].run_step_s for t in ts}),
        ("the run's eval per image (ms, one measure)", {t: 1000 * rows[t].run_eval_s for t in ts}),
    ]
    print(f"{'measure':46} {'t':>3} {'value':>10} {f'x t={first}':>7} {f'x t={ref}' if ref else 'x t=10':>7}")
    for name, values in measures:
        if not values:
            print(f"{name:46} not measured here (the reason is printed above)")
            continue
        for t in ts:
            if t in values:
                print(f"{name:46} {t:3d} {values[t]:10.3f} {ratio_cells(values, t, ref)}")
    print("bytes written by kind (bytes): " + "; ".join(
        f"t={t}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(rows[t].written.items())) for t in ts))
    last = ts[-1]
    if ref is None or last == ref:
        print(f"bar (t={last} within {BAR:.2f}x of t={BAR_REF}): not judged, --tasks must hold {BAR_REF} and a "
              "later t")
        return
    for name, values in (measures[0], measures[2]):
        label = name.split(" (")[0]
        if last not in values or ref not in values:
            print(f"bar: {label}: not measured")
            continue
        q = values[last] / values[ref]
        print(f"bar: {label} t={last} / t={ref} = {q:.3f} (<= {BAR:.2f}): {'PASS' if q <= BAR else 'FAIL'}")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the stream, measure, print; exit 0 whatever the bar says (the printed verdict says it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 25, 50], help="task counts t to measure at")
    ap.add_argument("--config", default=str(ROOT / "exps/sdlora_c100.json"), help="the method config")
    ap.add_argument("--model", default="vit_small_patch14_dinov2", help="timm ViT name (random init)")
    ap.add_argument("--backbone_kwargs", type=json.loads, default={"depth": 4},
                    help="timm keyword arguments as JSON (default: 4 blocks; '{}' for the whole model)")
    ap.add_argument("--img_size", type=int, default=70)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--rank", type=int, default=None, help="lora_rank (default: the config's)")
    ap.add_argument("--classes_per_task", type=int, default=2)
    ap.add_argument("--train_per_class", type=int, default=20, help="training images per class (20: 2 steps a task)")
    ap.add_argument("--test_per_class", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--log_dir", help="where the run folder and its copies go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    if sorted(set(args.tasks)) != args.tasks or args.tasks[0] < 1:
        ap.error("--tasks must be increasing task counts >= 1")
    if args.amp and not args.device.startswith("cuda"):
        ap.error("--amp needs --device cuda")
    tmp = None if args.log_dir else tempfile.mkdtemp(prefix="long_stream_")
    base = Path(args.log_dir or tmp)
    try:
        cfg = build_cfg(args, base / "runs")
        device = resolve_device(cfg.device)
        data = load_dataset(cfg)
        dm = DataManager.for_config(cfg, data, cfg.seeds[0])
        print(f"# {cfg.model_name} ({Path(args.config).name}) on {args.model} {args.backbone_kwargs} @{args.img_size}, "
              f"batch {args.batch}, rank {cfg.lora_rank}, {dm.n_tasks} tasks of {args.classes_per_task} classes, "
              f"{args.train_per_class} train / {args.test_per_class} test images per class; device {device}, "
              f"threads {torch.get_num_threads()}, torch {torch.__version__}")
        rows = {t: Row(t) for t in args.tasks}
        snapshots = base / "after"
        t0 = time.perf_counter()
        run_dir = run_stream(cfg, dm, device, rows, snapshots)
        print(f"# the run: {time.perf_counter() - t0:.1f} s for {dm.n_tasks} tasks")
        t0 = time.perf_counter()
        time_steps_and_eval(cfg, dm, device, run_dir, rows, args.repeats)
        time_resume(cfg, device, snapshots, rows, args.repeats)
        print(f"# side by side: {time.perf_counter() - t0:.1f} s, {args.repeats} rounds")
        report(rows, device)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from benchmarks.cli import run
    sys.exit(run(main))
