"""The task loop every method shares: build the network, train a task, evaluate, save, resume.

A method (one file in models/) subclasses ``Learner`` and overrides a few hooks: which gate it
uses, its alpha default, what trains in a task (``train_task``), what happens at the end of a task
(``end_task``) and what extra it saves. Everything else (data loaders, the epoch loop, masked
cross-entropy, metrics, safetensors checkpoints, resuming) lives here once.
"""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbone.gate import AdapterGate
from backbone.head import GrowingHead
from backbone.vit import ADAPTER_KEYS, LoRAViT, create_vit
from models import heads
from utils.config import Config, check_device
from utils import dist
from utils.data.data_manager import DataManager, EpochSampler
from utils.io import CheckpointError, load_tensors, save_tensors
from utils.memory import PeakMemory
from utils.metrics import topk_correct
from utils.optim import build_optimizer, build_scheduler
from utils.data.augment import DeviceAugment
from utils.data.loaders import make_loader
from utils.run_metrics import RunMetrics
from utils.tracking import Tracker
from utils.data.transforms import build_transforms

log = logging.getLogger("cl")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; earlier tasks' results are already saved."""


def task_seed(seed: int, task: int) -> int:
    """Each task starts from its own seed, so a resumed run retraces an uninterrupted one."""
    return seed + 7919 * task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Net(nn.Module):
    """Backbone features followed by the growing linear head."""

    def __init__(self, backbone: LoRAViT, head: GrowingHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Learner:
    """Class-incremental training of a frozen ViT with per-task adapters and a growing head."""

    name: ClassVar[str] = "base"
    default_alpha: ClassVar[float] = 0.8

    def __init__(self, cfg: Config, device: torch.device, run_dir: Path, seed: int):
        self.cfg, self.device, self.run_dir, self.seed = cfg, device, Path(run_dir), seed
        self._check_device()
        seed_everything(seed)  # a random-init backbone depends on it
        vit = create_vit(cfg.backbone_type, cfg.pretrained, cfg.pretrained_path, cfg.img_size, cfg.backbone_kwargs)
        gate = self.make_gate(len(vit.blocks))
        backbone = LoRAViT(vit, gate, cfg.lora_targets, cfg.direction_norm, cfg.adapter_strategy)
        self.net = Net(backbone, self.make_head(backbone.num_features)).to(device)
        # the classifier a test image meets when ``head`` is not the linear one (models/heads.py)
        self.classifier = heads.make_head(cfg.head_kind, backbone.num_features, seed, device, cfg)
        self.first_session = heads.make_first_session(cfg, backbone.num_features, seed, device)  # first_session_head
        mean = vit.pretrained_cfg.get("mean") if cfg.normalize else None
        std = vit.pretrained_cfg.get("std") if cfg.normalize else None
        self.train_tf, self.test_tf = build_transforms(cfg.img_size, cfg.crop_scale, mean, std)
        self.device_augment = DeviceAugment(cfg.img_size, cfg.crop_scale, mean, std)
        self.book = RunMetrics(self.run_dir)
        self.peak_memory = PeakMemory(device)  # each task's peak (metrics.json: peak_memory_mb)
        self.tracker = Tracker(cfg.loggers, self.run_dir, cfg.to_dict())
        self.task_epochs = 0  # epochs run in the task in progress, every phase counted (the trackers' step)
        self.task_steps = 0  # optimiser steps of the task in progress (metrics: train_steps, the compute a rule spends)
        self.n_new = 0  # classes of the task in progress
        if cfg.compile:
            import torch._dynamo
            # the adapter set changes at every task boundary: allow those recompilations
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.net.backbone.vit = torch.compile(self.net.backbone.vit)

    # ---- hooks a method overrides ---------------------------------------------------------------
    def make_gate(self, n_layers: int) -> AdapterGate:
        return AdapterGate(n_layers)

    def make_head(self, n_features: int) -> GrowingHead:
        """The classifier over the backbone's features: a linear head that grows by a task's classes."""
        return GrowingHead(n_features)

    def train_loader(self, dm: DataManager, task: int) -> DataLoader:
        """The images ``train_task`` sees: the task's training set, augmented and shuffled."""
        return self.loader(dm.train_set(task, self.train_tf), train=True, task=task)

    @property
    def alpha_init(self) -> float:
        return self.cfg.alpha_init if self.cfg.alpha_init is not None else self.default_alpha

    def rank(self, task: int) -> int:
        """The adapter rank of a task: lora_rank, or the rank_schedule entry in force."""
        sched = self.cfg.rank_schedule
        if not sched:
            return self.cfg.lora_rank
        return [r for first, r in sched if first <= task][-1]

    def adapter_spec(self, task: int):
        """How task ``task``'s adapter is parametrised: None for plain LoRA factors, or a spec that the
        backbone builds it from (backbone/subspace.py)."""
        return None

    def begin_task(self, task: int, n_new_classes: int) -> None:
        """Grow the head; add this task's adapter (and reset alphas if configured)."""
        self.net.head.expand(n_new_classes)
        self.net.head.to(self.device)
        if self.cfg.alpha_reset_each_task:
            self.gate.reset_alphas(self.alpha_init)
        self.net.backbone.add_task(task, self.rank(task), self.alpha_init, self.adapter_spec(task))
        if not self.cfg.train_old_alphas:
            for t in range(task):
                self.gate.alpha[str(t)].requires_grad_(False)
        self.net.to(self.device)

    def train_task(self, task: int, loader: DataLoader) -> None:
        """Default: one phase training every trainable tensor with the configured optimiser."""
        self.fit(task, loader, self.param_groups(), self.epochs(task), desc=f"Task {task}")

    def end_task(self, task: int) -> None:
        """Freeze the task's adapter: from now on it is one of the stacked, frozen ones."""
        self.net.backbone.freeze_current()

    def epoch_scalars(self) -> dict[str, float]:
        """Method-specific scalars the trackers log after each epoch (``loggers``)."""
        return {}

    def record_extra(self, task: int) -> None:
        """Method-specific entries of metrics.json for this task (``self.metrics``), written with the rest."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Method-specific tensors saved in each task's checkpoint (the gate saves its own)."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # ---- shared pieces ---------------------------------------------------------------------------
    @property
    def gate(self) -> AdapterGate:
        return self.net.backbone.gate

    def _check_device(self) -> None:
        check_device(self.cfg, self.device.type)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.tf32
            torch.backends.cudnn.allow_tf32 = self.cfg.tf32

    def epochs(self, task: int) -> int:
        return self.cfg.init_epoch if task == 0 and self.cfg.init_epoch else self.cfg.epochs

    def _task_opt_settings(self, task: int) -> dict:
        c = self.cfg
        first = task == 0
        pick = lambda init, base: init if first and init is not None else base  # noqa: E731
        return dict(lr=pick(c.init_lr, c.lrate), weight_decay=pick(c.init_weight_decay, c.weight_decay),
                    milestones=pick(c.init_milestones, c.milestones), decay=pick(c.init_lr_decay, c.lrate_decay))

    def param_groups(self) -> list[dict]:
        """One group of every tensor that requires grad (adapter, alphas, head...)."""
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, task: int, lo: int) -> torch.Tensor:
        """Cross-entropy; on tasks > 0 over the current task's logits only (``mask_old_logits``)."""
        if task > 0 and self.cfg.mask_old_logits:
            return F.cross_entropy(logits[:, lo:], y - lo)
        return F.cross_entropy(logits, y)

    def _autocast(self):
        if self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def loader(self, dataset, train: bool, task: int) -> DataLoader:
        """The task's training (shuffled) or evaluation loader (utils/loaders.py)."""
        return make_loader(self.cfg, dataset, train, task_seed(self.seed, task), self.device, self.device_augment)

    def fit(self, task: int, loader: DataLoader, groups: list[dict], epochs: int, desc: str,
            extra_loss: Optional[Callable[[], torch.Tensor]] = None,
            on_step: Optional[Callable[[], None]] = None,
            on_epoch: Optional[Callable[[int], bool]] = None) -> None:
        """The epoch loop: masked CE (+ extra_loss), optimiser and schedule from the config.

        One host-device sync per epoch (the loss check and the log line), none per step. ``on_epoch``
        is called with the number of epochs done after each one; True ends the loop there.
        """
        s = self._task_opt_settings(task)
        opt = build_optimizer(self.cfg.optimizer, groups, s["lr"], s["weight_decay"], self.cfg.momentum)
        sched = build_scheduler(self.cfg.scheduler, opt, epochs, s["milestones"], s["decay"], self.cfg.min_lr)
        lo = self.net.head.out_features - self.n_new
        seen_lo = lo if task > 0 and self.cfg.mask_old_logits else 0  # train accuracy over the logits the loss sees
        model = dist.wrap(self.net, self.device)  # DistributedDataParallel under torchrun
        for epoch in range(epochs):
            self.net.train()
            if isinstance(getattr(loader, "sampler", None), EpochSampler):
                loader.sampler.set_epoch(epoch)
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            seen = 0
            bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                       disable=self.cfg.progress_disabled)
            for x, y in bar:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if on_step is not None:
                    on_step()
                with self._autocast():
                    logits = model(x)
                    loss = self.task_loss(logits.float(), y, task, lo)
                    if extra_loss is not None:
                        loss = loss + extra_loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.task_steps += 1
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach()[:, seen_lo:].argmax(1) + seen_lo == y).sum()
                seen += len(y)
            sched.step()
            # over every process: each sees the same figures, so a NaN stops all of them together
            stats = dist.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), device=self.device, dtype=torch.float64)]))
            loss_sum, correct, seen = stats[0], stats[1], int(stats[2])
            mean_loss = float(loss_sum) / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(
                    f"{desc}: the loss became {mean_loss} in epoch {epoch + 1}; results of earlier tasks "
                    f"are saved in {self.run_dir}. Lower 'lrate' or check the data.")
            log.info(f"{desc}, Epoch {epoch + 1}/{epochs} => Loss {mean_loss:.3f}, "
                     f"Train_accy {100.0 * float(correct) / max(seen, 1):.2f}")
            self.task_epochs += 1
            if self.tracker.backends:  # epoch_scalars may read the device: only when something is logged
                self.tracker.epoch(task, 1000 * task + self.task_epochs, desc, dict(
                    {"train/loss": mean_loss, "train/accuracy": 100.0 * float(correct) / max(seen, 1)},
                    **self.epoch_scalars()))
            if on_epoch is not None and on_epoch(epoch + 1):
                return

    @torch.no_grad()
    def evaluate(self, dm: DataManager, task: int) -> dict:
        """Top-1 per task, overall, old/new and top-5 on every seen class's test images."""
        self.net.eval()
        test = dm.test_set(task, self.test_tf)
        if dist.world() > 1:  # each process evaluates every world-th image; the predictions are gathered
            test = test.subset(range(dist.rank(), len(test), dist.world()))
        loader = self.loader(test, train=False, task=task)
        preds, labels, top5 = [], [], 0
        for x, y in tqdm(loader, desc=f"Eval task {task}", leave=False, disable=self.cfg.progress_disabled):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.logits(x)
            preds.append(logits.argmax(1))
            labels.append(y)
            top5 += topk_correct(logits, y, 5)
        parts = dist.gather((torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy(), top5))
        pred = np.concatenate([p for p, _, _ in parts])
        y = np.concatenate([t for _, t, _ in parts])
        top5 = sum(k for _, _, k in parts)
        hit = pred == y
        tasks_of = dm.task_of_label(y)
        per_task = [100.0 * float(hit[tasks_of == j].mean()) for j in range(task + 1)]
        lo = dm.task_range(task)[0]
        old = hit[y < lo]
        return {
            "per_task": per_task,
            "total": 100.0 * float(hit.mean()),
            "old": 100.0 * float(old.mean()) if old.size else None,
            "new": 100.0 * float(hit[y >= lo].mean()),
            "top5": 100.0 * top5 / len(y),
            "grouped": self._grouped(hit, y, dm, task),
        }

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The scores a test image gets: the network's own head, or the statistics head (``head``)."""
        if self.classifier is None:
            return self.net(x).float()
        return heads.classify(self, x)

    @staticmethod
    def _grouped(hit: np.ndarray, y: np.ndarray, dm: DataManager, task: int) -> dict:
        out = {}
        for j in range(task + 1):
            a, b = dm.task_range(j)
            sel = (y >= a) & (y < b)
            out[f"{a:02d}-{b - 1:02d}"] = round(100.0 * float(hit[sel].mean()), 2)
        return out

    # ---- bookkeeping: metrics and checkpoints --------------------------------------------------
    def active_adapters(self) -> list[int]:
        return self.gate.active_tasks()

    @property
    def metrics(self) -> dict:
        """The run's metrics so far (utils/run_metrics.py), as recorded after each task."""
        return self.book.values

    def record(self, task: int, res: dict, train_s: float, eval_s: float, peak_mb: Optional[float]) -> None:
        """Record a task's evaluation and costs, save metrics.json, tell the trackers, log."""
        active = self.active_adapters()
        self.book.record(res, active, self.net.backbone.adapter_param_count(active),
                         train_s, self.task_steps, eval_s, peak_mb)
        self.record_extra(task)
        self.book.save()
        self.tracker.task(task, {"task/A": res["total"], "task/old_accuracy": res["old"],
                                 "task/new_accuracy": res["new"], "task/active_adapters": len(active),
                                 "task/train_seconds": train_s})
        self.book.log_task(res, active if self.gate.n_tasks else None, task)

    def saved_metrics(self) -> dict:
        return self.book.saved()

    def load_metrics(self, saved: dict) -> None:
        self.book.load(saved)

    def headline(self) -> str:
        return self.book.headline()

    def checkpoint_tensors(self, task: int) -> dict[str, torch.Tensor]:
        """The whole head, the adapter that served task ``task`` and the gate, as plain tensors."""
        t = {"head.weight": self.net.head.weight, "head.bias": self.net.head.bias}
        t.update(self.net.backbone.adapter_tensors(task))
        t.update(self.gate.state_tensors())
        t.update(self.extra_tensors())
        return t

    def save_task(self, task: int) -> None:
        if self.cfg.save_adapters:
            save_tensors(self.run_dir / f"task_{task}.safetensors", self.checkpoint_tensors(task),
                         metadata={"task": str(task), "model_name": self.cfg.model_name})
        if self.classifier is not None:
            heads.save_state(self, task)

    def restore(self, dm: DataManager, done: int) -> None:
        """Rebuild the state after tasks 0..done from a run folder's task checkpoints.

        Structure is replayed (head growth, adapters) and every tensor is loaded; no method
        decision (pruning, ...) is taken again: the last checkpoint's mask and gate are used.
        """
        self.restore_network(dm, done)
        if self.classifier is not None:
            heads.restore_state(self, dm, done)

    def restore_network(self, dm: DataManager, done: int) -> None:
        """The network (adapters, gate, linear head) after task ``done``, from the task checkpoints."""
        try:
            self._restore(dm, done)
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the checkpoints in {self.run_dir} do not fit its config.json ({e}); was the "
                                  "config edited, or does the folder hold another run?") from None

    def _restore(self, dm: DataManager, done: int) -> None:
        backbone = self.net.backbone
        with backbone.configure_once():  # the frozen stacks built once, not once per task replayed
            for task in range(done + 1):
                self.n_new = dm.sizes[task]
                self.begin_task(task, dm.sizes[task])
                # an earlier task's checkpoint gives its adapter only: the head and gate come from the last one
                ck = load_tensors(self.run_dir / f"task_{task}.safetensors", None if task == done else ADAPTER_KEYS)
                backbone.load_adapter_tensors(task, ck)
                self.gate.current = None
            # ck: the last task's checkpoint, which holds the whole head and the gate
            with torch.no_grad():
                self.net.head.weight.copy_(ck["head.weight"])
                self.net.head.bias.copy_(ck["head.bias"])
            self.gate.load_state(ck)
            self.load_extra_tensors(ck)

    def _take_head(self, dm: DataManager, task: int, before: Optional[torch.Tensor]) -> None:
        """The statistics head takes the task's classes (models/heads.py); its record goes to metrics.json."""
        entries = dict(heads.take_task(self, dm, task, before), head_stored_numbers=heads.stored_numbers(self))
        for key, value in entries.items():
            self.metrics.setdefault(key, []).append(value)

    # ---- the task loop ---------------------------------------------------------------------------
    def run(self, dm: DataManager, start: int = 0) -> dict:
        """Train and evaluate tasks ``start``..end; metrics.json and checkpoints after every task."""
        self.book.tasks_planned = dm.n_tasks  # metrics.json says how many tasks the run is to train (--report)
        try:
            for task in range(start, dm.n_tasks):
                self._run_task(dm, task)
        finally:
            self.tracker.close()
        return self.metrics

    def _run_task(self, dm: DataManager, task: int) -> None:
        """One task: seed, structure, training, the statistics head, evaluation, record, checkpoint."""
        self.peak_memory.reset()  # the task's peak: its training, statistics head and evaluation
        h0 = time.perf_counter()
        before = heads.features_before(self, dm, task)  # drift compensation's view of the task, if any
        head_s = time.perf_counter() - h0
        seed_everything(task_seed(self.seed, task))
        lo, hi = dm.task_range(task)
        self.n_new = hi - lo
        log.info(f"Learning on {lo}-{hi} (task {task + 1}/{dm.n_tasks})")
        self.begin_task(task, hi - lo)
        self.task_steps = self.task_epochs = 0
        t0 = time.perf_counter()
        self.train_task(task, self.train_loader(dm, task))
        self.end_task(task)
        t1 = time.perf_counter()
        if self.classifier is not None:
            self._take_head(dm, task, before)
            self.metrics.setdefault("head_seconds", []).append(head_s + time.perf_counter() - t1)
        t2 = time.perf_counter()
        res = self.evaluate(dm, task)
        t3 = time.perf_counter()
        # the checkpoint first: metrics.json listing the task is what marks it done for --resume, so a kill
        # between the two writes leaves the task to be trained again, never a done task without its tensors
        peak_mb = self.peak_memory.read_mb()
        self.save_task(task)
        self.record(task, res, t1 - t0, t3 - t2, peak_mb)
