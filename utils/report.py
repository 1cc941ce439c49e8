"""Figures and tables from finished run folders: ``python main.py --report RUN_DIR [RUN_DIR ...]``.

Reads only what a run wrote (config.json, metrics.json, beta records), never the model, so it works on
runs of any method, finished or stopped after some tasks. Per run, PNGs in RUN_DIR/plots/: the
accuracy matrix, the A_t curve and, for adapter methods, the adapters in force after every task (with
the gate's beta for Gumbel runs) and, for growth rules, their need signal per task. With several runs, a
comparison figure, a per-run table and a mean +- std table over seeds, written next to the comparison figure
and printed.

Every run counts its tasks: done / planned (metrics.json's ``tasks_planned``, or for runs made before it was
recorded, the task count its config gives). A run that stopped before its last task is shown as such and left
out of the mean +- std unless ``include_unfinished``; runs are averaged only with runs of the same config and the
same number of tasks, and a second run of a seed already in a row (a repeat) is left out of it, named.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.data.data_manager import task_sizes  # noqa: E402
from utils.json_file import JsonFileError, read_json_file  # noqa: E402
from utils.run_folder import PATH_KEYS  # noqa: E402
from utils.run_metrics import metrics_problem  # noqa: E402

#: Config keys that do not change the experiment: runs differing only in these are seeds of one config.
NOT_EXPERIMENT = {"seed", "log_dir", "num_workers", "progress", "device", "max_tasks", "prefix", "save_adapters"}
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110})


class ReportError(ValueError):
    """A run folder that cannot be reported on, with the folder and the missing or broken file."""


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict
    gate: list[dict] = field(default_factory=list)  # Gumbel beta records, one per task
    label: str = ""

    @property
    def n_tasks(self) -> int:
        """The tasks the run finished (metrics.json lists them)."""
        return len(self.metrics["A"])

    @property
    def planned(self) -> Optional[int]:
        """The tasks the run was to train: recorded by the run, or (older runs) from its config; None: unknown."""
        if self.metrics.get("tasks_planned") is not None:
            return int(self.metrics["tasks_planned"])
        n = planned_from_config(self.config)
        return None if n is None else max(n, self.n_tasks)  # more done: resumed with a larger max_tasks

    @property
    def finished(self) -> bool:
        return self.planned is None or self.n_tasks >= self.planned

    @property
    def tasks(self) -> str:
        """Tasks done / planned, as the tables show them."""
        return f"{self.n_tasks}/{'?' if self.planned is None else self.planned}"

    @property
    def name(self) -> str:
        """The label and the seed: how a figure names the run (and its tasks, if it stopped early)."""
        stopped = "" if self.finished else f", stopped after {self.tasks} tasks"
        return f"{self.label}, seed {self.config.get('seed')}{stopped}"

    @property
    def method(self) -> str:
        return self.config["model_name"]


#: Class counts of the datasets whose count the config does not give (runs made before tasks_planned was recorded).
DATASET_CLASSES = {"cifar100": 100, "cifar224": 100, "imagenetr": 200, "imageneta": 200, "cub": 200, "domainnet": 345}


def planned_from_config(config: dict) -> Optional[int]:
    """The task count a config gives (its class count split by init_cls / increment, cut at max_tasks)."""
    classes = config.get("expected_classes") or (config.get("synthetic_classes") if config.get("dataset") == "synthetic"
                                                 else DATASET_CLASSES.get(config.get("dataset")))
    try:
        n = len(task_sizes(int(classes), int(config["init_cls"]), int(config["increment"])))
    except Exception:  # an unknown count or keys of another shape: unknown
        return None
    return min(n, config["max_tasks"]) if isinstance(config.get("max_tasks"), int) else n


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        why = ("(a run that stopped before it finished its first task has none)" if path.name == "metrics.json"
               else "(not a run folder)")
        raise ReportError(f"{path.parent}: no {path.name} {why}; leave the folder out of --report")
    try:
        value = read_json_file(path)
    except JsonFileError as e:
        raise ReportError(f"{path.parent}: {path.name} {e.reason}; leave the folder out of --report, or restore "
                          "it") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path.parent}: {path.name} holds a JSON {type(value).__name__}, not an object of {what}; "
                          "leave the folder out of --report, or restore the file")
    return value


def load_run(path) -> Run:
    """A run folder's config, metrics and (Gumbel) beta records; ReportError names what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder '{path}' does not exist" if not path.exists() else
                          f"'{path}' is a file, not a run folder")
    config, metrics = _read_json(path / "config.json", "config keys"), _read_json(path / "metrics.json", "metrics")
    if "til_A" in metrics:
        raise ReportError(f"{path} is a task-incremental run (til_* metrics, the task identity given): "
                          "--report compares class-incremental runs; read its metrics.json")
    missing = [k for k in ("accuracy_matrix", "A", "A_last", "A_avg", "forgetting") if k not in metrics]
    if missing or not metrics.get("A"):
        raise ReportError(f"{path}: metrics.json lacks {missing or ['any finished task']}; leave the folder out of "
                          "--report")
    problem = metrics_problem(metrics) or next((f"'{k}' is not a number" for k in ("A_last", "A_avg", "forgetting")
                                                if not isinstance(metrics[k], (int, float))), None)
    if problem:
        raise ReportError(f"{path}: metrics.json {problem}; leave the folder out of --report, or restore the file")
    if not isinstance(config.get("model_name"), str):
        raise ReportError(f"{path}: config.json has no model_name: not a run's config; restore the file")
    run = Run(path, config, metrics)
    if config.get("model_name") == "gumbel_sdlora":
        for t in range(run.n_tasks):
            rec = path / f"beta_values_task_{t}.pt"
            if not rec.is_file():
                raise ReportError(f"{path}: no {rec.name} for finished task {t}")
            try:
                run.gate.append(torch.load(rec, map_location="cpu", weights_only=True))
            except Exception as e:  # a damaged file: pickle, zip or EOF errors
                raise ReportError(f"{path}: {rec.name} cannot be read ({type(e).__name__}: {e}); restore it, or "
                                  "leave the folder out of --report") from None
    return run


def label_runs(runs: list[Run]) -> None:
    """Label = method, plus the config keys in which it differs from other runs of the same method: first the few
    that tell it from every other (``_telling_keys``), then the rest in the order config.json lists them (the
    schema's: run, data, backbone, optimisation, the method's own keys); three at most."""
    for r in runs:
        same = [o for o in runs if o.method == r.method and o is not r]
        order = list(dict.fromkeys([*r.config, *(k for o in same for k in o.config)]))
        differs = {k: {i for i, o in enumerate(same) if _shown(k, r.config.get(k)) != _shown(k, o.config.get(k))}
                   for k in order if k not in NOT_EXPERIMENT}
        telling = _telling_keys(differs, len(same))
        keys = telling + [k for k in differs if differs[k] and k not in telling]
        extra = ", ".join(f"{k}={json.dumps(_shown(k, r.config.get(k)))}" for k in keys[:3])
        r.label = r.method + (f" ({extra}{', ...' if len(keys) > 3 else ''})" if extra else "")


def _telling_keys(differs: dict[str, set[int]], n_others: int) -> list[str]:
    """Few keys that tell a run from each other run of its method: greedily the key that tells it from the most
    runs not yet told apart (ties: the config's order), so a key set by one run alone (its ``head``) names it."""
    left, keys = set(range(n_others)), []
    while left:
        best = max(differs, key=lambda k: len(differs[k] & left), default=None)
        if best is None or not differs[best] & left:
            break  # runs with the same experiment keys: nothing tells them apart
        keys.append(best)
        left -= differs[best]
    return keys


def _shown(key: str, value):
    """A value as a label shows it and runs are compared by: a path key by its file's name, so a run folder
    that stored the path relative (before 2026-12-07) and one that stored it absolute are the same config."""
    return Path(value).name if key in PATH_KEYS and isinstance(value, str) else value


def _experiment_key(run: Run) -> str:
    """Runs with the same key are seeds of one config: equal config but for the seed and the bookkeeping keys,
    and the same number of finished tasks (A_last after 3 tasks is not A_last after 10)."""
    return json.dumps([{k: _shown(k, v) for k, v in run.config.items() if k not in NOT_EXPERIMENT}, run.n_tasks],
                      sort_keys=True)


# ---- figures --------------------------------------------------------------------------------------
#: Up to this many tasks a figure's task axis has a tick per task and the accuracy matrix a number per cell.
EVERY_TASK = 20


def _task_ticks(ax, T: int, axis: str = "x") -> None:
    """A tick per task up to EVERY_TASK tasks, past that every 5th (or 10th past 100): 50 labels do not fit."""
    step = 1 if T <= EVERY_TASK else 5 if T <= 100 else 10
    (ax.set_xticks if axis == "x" else ax.set_yticks)(range(0, T, step))


def plot_accuracy_matrix(run: Run, out: Path) -> Path:
    T = run.n_tasks
    m = np.full((T, T), np.nan)
    for t, row in enumerate(run.metrics["accuracy_matrix"]):
        m[t, :len(row)] = row
    cells = min(T, EVERY_TASK)  # past EVERY_TASK tasks the figure stops growing and the cells lose their numbers
    fig, ax = plt.subplots(figsize=(max(4.5, 0.62 * cells + 2.2), max(3.8, 0.55 * cells + 1.6)))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
    if T <= EVERY_TASK:
        size = 10 if T <= 10 else 10 - (T - 10) // 3
        for t in range(T):
            for j in range(t + 1):
                ax.text(j, t, f"{m[t, j]:.0f}", ha="center", va="center", fontsize=size,
                        color="white" if m[t, j] < 60 else "black")
    _task_ticks(ax, T)
    _task_ticks(ax, T, "y")
    ax.set_xlabel("test images of task j")
    ax.set_ylabel("after training task t")
    ax.set_title(f"accuracy (%): A_last {run.metrics['A_last']:.2f}, forgetting "
                 f"{run.metrics['forgetting']:.2f}", fontsize=11)
    _suptitle(fig, run.name)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, out / "accuracy_matrix.png")


def plot_curve(run: Run, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(run.n_tasks)
    ax.plot(x, run.metrics["A"], "o-", label="all seen classes (A_t)")
    old = [np.nan if v is None else v for v in run.metrics.get("old_accuracy", [])]
    if old and any(not math.isnan(v) for v in old):
        ax.plot(x, old, "s--", alpha=0.7, label="old classes")
        ax.plot(x, run.metrics["new_accuracy"], "^--", alpha=0.7, label="new classes")
    ax.set_xlabel("task t")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    _task_ticks(ax, run.n_tasks)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    ax.set_title(f"A_last {run.metrics['A_last']:.2f}, A_avg {run.metrics['A_avg']:.2f}", fontsize=11)
    _suptitle(fig, run.name)
    return _save(fig, out / "accuracy_curve.png")


def plot_adapters(run: Run, out: Path) -> Optional[Path]:
    """Adapters in force after every task; for Gumbel runs the deterministic beta beside it."""
    active = run.metrics.get("active_adapters") or []
    if not any(active):
        return None
    T = run.n_tasks
    panels = 2 if run.gate else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + 0.6, 4.2), squeeze=False)
    if run.gate:
        ax = axes[0, 0]
        beta = np.full((T, T), np.nan)
        pruned = np.zeros((T, T), dtype=bool)
        for t, rec in enumerate(run.gate):
            b = rec["beta_values"]
            b = b.max(0).values if b.dim() > 1 else b  # per-block gates: the largest
            mask = rec["pruning_mask"]
            beta[t, :len(b)] = b.numpy()
            pruned[t, :len(mask)] = (mask <= 0).numpy()
        im = ax.imshow(beta, cmap="magma", vmin=0, vmax=1)
        reused = {t: int(rec["trained_adapter"]) for t, rec in enumerate(run.gate)
                  if int(rec.get("trained_adapter", t)) != t}  # skip_mode reuse: the adapter task t trained
        for t in range(T):
            for i in range(t + 1):
                if i == t and t in reused:
                    ax.text(i, t, f"→{reused[t]}", ha="center", va="center", color="tab:cyan", fontsize=9,
                            fontweight="bold")
                elif pruned[t, i]:
                    ax.text(i, t, "×", ha="center", va="center", color="tab:cyan", fontsize=12, fontweight="bold")
                elif T <= 12:
                    ax.text(i, t, f"{beta[t, i]:.2g}", ha="center", va="center", fontsize=9,
                            color="white" if beta[t, i] < 0.5 else "black")
        _task_ticks(ax, T)
        _task_ticks(ax, T, "y")
        ax.set_xlabel("adapter i (its task)")
        ax.set_ylabel("after task t")
        ax.set_title("gate value g in force (× pruned" + (", →k: trained adapter k)" if reused else ")"),
                     fontsize=11)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[0, -1]
    x = np.arange(T)
    ax.plot(x, x + 1, "--", color="grey", label="one adapter per task")
    ax.plot(x, active, "o-", color="tab:red", label="active adapters")
    ax.set_xlabel("task t")
    ax.set_ylabel("adapters")
    _task_ticks(ax, T)
    ax.set_ylim(0, T + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(f"{active[-1]} of {T} adapters active", fontsize=11)
    _suptitle(fig, run.name)
    return _save(fig, out / "adapters.png")


def growth_signal(run: Run) -> Optional[tuple[str, dict[int, float], dict[int, bool]]]:
    """What a growth rule measured per task and whether it grew: the held-out gain (need), the drift, or
    the Gumbel warm-up probe (loss without the new adapter minus with it); None for runs without a rule."""
    growth = run.metrics.get("growth") or []
    for key, name in (("gain", "held-out gain of a new adapter over reuse (nats)"),
                      ("fit", "held-out loss of reuse over ln(classes) (1 = chance)"),
                      ("drift", "drift of the earlier classes' logits under reuse"),
                      ("novelty", "novelty: mean token shift from the "
                                  f"{run.config.get('novelty_reference') or 'latest'}"
                                  " adapter's tasks (pretrained features)")):
        if growth and key in growth[0]:
            return name, {g["task"]: g[key] for g in growth}, {g["task"]: bool(g["grow"]) for g in growth}
    probes = {t: r["loss_without"] - r["loss_with"] for t, r in enumerate(run.gate) if "loss_with" in r}
    if probes:
        grew = {t: int(r.get("trained_adapter", t)) == t and float(r["pruning_mask"][t]) > 0
                for t, r in enumerate(run.gate) if t in probes}
        return "warm-up probe: loss without the new adapter - with it (nats)", probes, grew
    return None


def plot_growth_signal(run: Run, out: Path) -> Optional[Path]:
    """The rule's need signal per task, the tasks where it grew filled, the shifted tasks shaded."""
    found = growth_signal(run)
    if found is None:
        return None
    name, signal, grew = found
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for t in run.config.get("shift_tasks") or []:
        ax.axvspan(t - 0.4, t + 0.4, color="tab:orange", alpha=0.2, lw=0)
    tasks = sorted(signal)
    ax.plot(tasks, [signal[t] for t in tasks], "-", color="grey", lw=1)
    for t in tasks:
        ax.plot(t, signal[t], "o", ms=8, color="tab:red" if grew.get(t) else "white", mec="tab:red")
    thr = (run.metrics.get("growth") or [{}])[0]
    key = next((k for sig, k in (("gain", "need_threshold"), ("fit", "need_threshold"), ("drift", "drift_threshold"),
                                 ("novelty", "novelty_threshold")) if sig in thr), None)
    if key and run.config.get(key) is not None:
        ax.axhline(run.config[key], ls="--", color="tab:blue", lw=1, label=f"{key} {run.config[key]}")
        ax.legend(loc="best", fontsize=9)
    _task_ticks(ax, run.n_tasks)
    ax.set_xlabel("task (shaded: shift_tasks; filled: grew an adapter)")
    ax.set_ylabel("need signal")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    _suptitle(fig, run.name)
    return _save(fig, out / "growth_signal.png")


def plot_comparison(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in runs:
        ax.plot(np.arange(r.n_tasks), r.metrics["A"], "o-", ms=4, label=r.name)
    _task_ticks(ax, max(r.n_tasks for r in runs))
    ax.set_xlabel("task t")
    ax.set_ylabel("A_t: top-1 on all seen classes (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Accuracy after each task")
    return _save(fig, out / "comparison.png")


def plot_tradeoff(summary: list[dict], out: Path) -> Optional[Path]:
    """A_last and A_avg against the adapters kept after the last task: one point per config, its mean over
    seeds, with the std over seeds as error bars on both axes. None when no config has adapters."""
    rows = [e for e in summary if e["active_adapters"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>phX*"
    for ax, key in zip(axes, ("A_last", "A_avg")):
        for i, e in enumerate(rows):
            (x, dx), (y, dy) = e["active_adapters"], e[key]
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=markers[i % len(markers)], ms=7, capsize=3,
                        label=f"{e['method']} (n={len(e['seeds'])})")
        ax.set_xlabel("adapters after the last task")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{key} against adapters (mean ± std over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, [textwrap.shorten(t, 120) for t in labels], loc="lower center", ncol=1, fontsize=8)
    return _save(fig, out / "tradeoff.png", rect=(0, 0.04 + 0.04 * len(rows), 1, 1))  # room for the legend


def _suptitle(fig, text: str) -> None:
    """The run's name over the whole figure, wrapped so that no label is cut at the edge."""
    width = max(40, int(fig.get_size_inches()[0] * 9))
    fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=10)


def _save(fig, path: Path, rect: Optional[tuple] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- tables ---------------------------------------------------------------------------------------
def run_row(run: Run) -> dict:
    m = run.metrics
    train = m.get("train_seconds") or []
    return {"run": run.path.name, "method": run.label, "seed": run.config.get("seed"),
            "tasks": run.n_tasks, "tasks_planned": run.planned, "A_last": m["A_last"], "A_avg": m["A_avg"],
            "forgetting": m["forgetting"], "active_adapters": (m.get("active_adapters") or [None])[-1],
            "adapter_params": (m.get("adapter_params") or [None])[-1],
            "train_s_per_task": sum(train) / len(train) if train else None,
            "train_s": sum(train) if train else None,
            "train_steps": sum(m["train_steps"]) if m.get("train_steps") else None}


def _is_reference(run: Run) -> bool:
    """Plain SD-LoRA (an adapter per task, no growth rule): what a rule's compute is measured against."""
    c = run.config
    return (c.get("model_name") == "sdlora" and c.get("growth_schedule") is None
            and all(c.get(k) is None for k in ("drift_threshold", "need_threshold", "novelty_threshold")))


def _data_key(run: Run) -> str:
    """Runs on the same stream (data, seed and shift): rows whose compute compares."""
    c = run.config
    keys = ("dataset", "data_path", "seed", "shift_tasks", "train_per_class", "img_size", "epochs", "batch_size",
            "max_tasks")
    return json.dumps([c.get(k) for k in keys] + [c.get("shift_kind", "grey_invert")])


def runs_table(runs: list[Run]) -> str:
    lines = ["| method | seed | tasks | A_last | A_avg | forgetting | active adapters | stored adapter params "
             "| train s / task |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = run_row(r)
        act = "-" if w["active_adapters"] is None else f"{w['active_adapters']}/{w['tasks']}"
        par = "-" if w["adapter_params"] is None else f"{w['adapter_params']:,}"
        sec = "-" if w["train_s_per_task"] is None else f"{w['train_s_per_task']:.0f}"
        tasks = r.tasks + ("" if r.finished else " (stopped)")
        lines.append(f"| {w['method']} | {w['seed']} | {tasks} | {w['A_last']:.2f} | {w['A_avg']:.2f} | "
                     f"{w['forgetting']:.2f} | {act} | {par} | {sec} |")
    return "\n".join(lines)


def summary_runs(runs: list[Run], include_unfinished: bool = False) -> tuple[list[Run], list[str]]:
    """The runs the mean +- std is taken over, and a line for each run left out: one that stopped before its
    last task (unless ``include_unfinished``), and a repeat of a seed already in its config's row."""
    kept, notes, seen = [], [], {}
    for r in runs:
        if not r.finished and not include_unfinished:
            notes.append(f"{r.path}: {r.tasks} tasks, stopped before the end (--include_unfinished puts it in, "
                         "averaged only with runs of as many tasks)")
            continue
        key = (_experiment_key(r), json.dumps(r.config.get("seed")))
        if key in seen:
            notes.append(f"{r.path}: seed {r.config.get('seed')} again (as {seen[key].path}): a repeat, not "
                         "another seed")
            continue
        seen[key] = r
        kept.append(r)
    return kept, notes


def seed_summary(runs: list[Run]) -> list[dict]:
    """Per config (runs equal but for the seed, with as many tasks): mean and std over seeds (std 0 for one seed).
    Give it ``summary_runs``' choice: it averages whatever it is given."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_experiment_key(r), []).append(r)
    ref_steps = {_data_key(r): run_row(r)["train_steps"] for r in runs if _is_reference(r)}
    out = []
    for members in groups.values():
        rows = [run_row(r) for r in members]
        for r, w in zip(members, rows):  # optimiser steps over plain SD-LoRA's on the same stream and seed
            ref = ref_steps.get(_data_key(r))
            w["relative_steps"] = w["train_steps"] / ref if ref and w["train_steps"] else None
        planned = sorted({str("?" if r.planned is None else r.planned) for r in members})
        entry = {"method": members[0].label, "seeds": [w["seed"] for w in rows], "tasks_done": members[0].n_tasks,
                 "tasks_planned": ", ".join(planned)}
        for k in SUMMARY_KEYS:
            vals = np.array([w[k] for w in rows if w[k] is not None], dtype=float)
            entry[k] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0) if len(vals) else None
        out.append(entry)
    return out


#: The columns of the seed summary: mean +- std of each over the seeds of one config.
SUMMARY_KEYS = ("A_last", "A_avg", "forgetting", "active_adapters", "relative_steps", "train_s")


def summary_markdown(summary: list[dict]) -> str:
    lines = ["| method | seeds | tasks | A_last | A_avg | forgetting | active adapters | training steps / SD-LoRA's "
             "| train s |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        cells = ["-" if e[k] is None else f"{e[k][0]:.0f} ± {e[k][1]:.0f}" if k == "train_s"
                 else f"{e[k][0]:.2f} ± {e[k][1]:.2f}" for k in SUMMARY_KEYS]
        lines.append(f"| {e['method']} | {', '.join(map(str, e['seeds']))} | {e['tasks_done']}/{e['tasks_planned']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_csv(summary: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "seeds", "n_seeds"] + [f"{k}_{s}" for k in SUMMARY_KEYS for s in ("mean", "std")]
               + ["tasks_done", "tasks_planned"])
    for e in summary:
        vals = []
        for k in SUMMARY_KEYS:
            vals += ["", ""] if e[k] is None else [f"{e[k][0]:.4f}", f"{e[k][1]:.4f}"]
        w.writerow([e["method"], " ".join(map(str, e["seeds"])), len(e["seeds"])] + vals
                   + [e["tasks_done"], e["tasks_planned"]])
    return buf.getvalue()


# ---- the command --------------------------------------------------------------------------------------
def _writable(folder: Path, what: str) -> None:
    """``folder`` (or, where it does not exist yet, the folder it would be made in) takes files."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ReportError(f"{what} '{folder}' cannot be made: '{probe}' is a file; choose another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ReportError(f"{what} '{folder}' cannot be written ('{probe}' is read-only); make it writable, or "
                          "choose another --report_out")


def report(paths: list, out: Optional[Path] = None, include_unfinished: bool = False) -> str:
    """Figures for every run; with several runs, the comparison, tables and seed summary in ``out``
    (default: a ``report`` folder beside the first run). Returns the printed text."""
    runs = [load_run(p) for p in paths]  # every folder is checked before anything is written
    out = (Path(out) if out else runs[0].path.parent / "report") if len(runs) > 1 else None
    for r in runs:
        _writable(r.path / "plots", "the plots folder")
    if out is not None:
        _writable(out, "--report_out")
    label_runs(runs)
    try:
        return _write(runs, out, include_unfinished)
    except OSError as e:  # a disk that fills up or goes read-only half-way
        raise ReportError(f"could not write '{e.filename or out}': {e.strerror or e}; free space or fix the mount, "
                          "then run --report again") from None


def _write(runs: list[Run], out: Optional[Path], include_unfinished: bool) -> str:
    text = []
    for r in runs:
        plots = r.path / "plots"
        made = [plot_accuracy_matrix(r, plots), plot_curve(r, plots), plot_adapters(r, plots),
                plot_growth_signal(r, plots)]
        text.append(f"{r.path}: " + ", ".join(p.name for p in made if p is not None) + f" in {plots}")
    table = runs_table(runs)
    kept, notes = summary_runs(runs, include_unfinished)
    summary = seed_summary(kept)
    text += ["", table, "", "Mean ± std over seeds (tasks: done/planned):", summary_markdown(summary)]
    if notes:
        text += ["", "Left out of the mean ± std:"] + [f"- {n}" for n in notes]
    if out is not None:
        plot_comparison(runs, out)
        plot_tradeoff(summary, out)
        (out / "runs.md").write_text(table + "\n")
        (out / "summary.md").write_text(summary_markdown(summary) + "\n"
                                        + "".join(f"\nLeft out: {n}" for n in notes) + ("\n" if notes else ""))
        (out / "summary.csv").write_text(summary_csv(summary))
        text.append(f"\ncomparison.png, tradeoff.png, runs.md, summary.md, summary.csv in {out}")
    return "\n".join(text)
