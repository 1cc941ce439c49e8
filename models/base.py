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
from backbone.subspace import SubspaceSpec
from backbone.vit import LoRAViT, create_vit
from utils.config import Config, ConfigError, check_device
from utils import dist
from utils.data_manager import DataManager, EpochSampler, TaskDataset
from utils.io import CheckpointError, load_tensors, save_tensors
from utils.metrics import topk_correct
from utils.optim import build_optimizer, build_scheduler
from utils.augment import DeviceAugment
from utils.device_loader import DeviceLoader
from utils.run_metrics import RunMetrics
from utils.tracking import Tracker
from utils.transforms import build_transforms

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


def _seed_worker(_: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


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
    uses_adapters: ClassVar[bool] = True
    # "til_": accuracies measured with the task identity given are saved as til_* keys, never as the
    # class-incremental A, A_last, ...
    metric_prefix: ClassVar[str] = ""
    default_alpha: ClassVar[float] = 0.8

    def __init__(self, cfg: Config, device: torch.device, run_dir: Path, seed: int):
        self.cfg, self.device, self.run_dir, self.seed = cfg, device, Path(run_dir), seed
        self._check_device()
        seed_everything(seed)  # a random-init backbone depends on it
        vit = create_vit(cfg.backbone_type, cfg.pretrained, cfg.pretrained_path, cfg.img_size, cfg.backbone_kwargs)
        gate = self.make_gate(len(vit.blocks))
        backbone = LoRAViT(vit, gate, cfg.lora_targets, cfg.direction_norm, cfg.adapter_strategy)
        self.net = Net(backbone, GrowingHead(backbone.num_features)).to(device)
        mean = vit.pretrained_cfg.get("mean") if cfg.normalize else None
        std = vit.pretrained_cfg.get("std") if cfg.normalize else None
        self.train_tf, self.test_tf = build_transforms(cfg.img_size, cfg.crop_scale, mean, std)
        self.device_augment = DeviceAugment(cfg.img_size, cfg.crop_scale, mean, std)
        self.book = RunMetrics(self.run_dir, self.metric_prefix)
        self.tracker = Tracker(cfg.loggers, self.run_dir, cfg.to_dict())
        self.task_epochs = 0  # epochs run in the task in progress, every phase counted (the trackers' step)
        self.task_steps = 0  # optimiser steps of the task in progress (metrics: train_steps, the compute a rule spends)
        self.trained_by: dict[int, int] = {}  # task -> the earlier adapter it reopened (skip_mode "reuse")
        self._check_subspace()
        if cfg.compile:
            import torch._dynamo
            # the adapter set changes at every task boundary: allow those recompilations
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.net.backbone.vit = torch.compile(self.net.backbone.vit)

    # ---- hooks a method overrides ---------------------------------------------------------------
    def make_gate(self, n_layers: int) -> AdapterGate:
        return AdapterGate(n_layers)

    @property
    def alpha_init(self) -> float:
        return self.cfg.alpha_init if self.cfg.alpha_init is not None else self.default_alpha

    def rank(self, task: int) -> int:
        """The adapter rank of a task: lora_rank, or the rank_schedule entry in force."""
        sched = self.cfg.rank_schedule
        if not sched:
            return self.cfg.lora_rank
        return [r for first, r in sched if first <= task][-1]

    def begin_task(self, task: int, n_new_classes: int) -> None:
        """Grow the head; add this task's adapter (and reset alphas if configured)."""
        self.net.head.expand(n_new_classes)
        self.net.head.to(self.device)
        if self.uses_adapters:
            if self.cfg.alpha_reset_each_task:
                self.gate.reset_alphas(self.alpha_init)
            self.net.backbone.add_task(task, self.rank(task), self.alpha_init, self.subspace_spec(task))
            self.net.to(self.device)

    def _check_subspace(self) -> None:
        """An intrinsic_dim the backbone cannot take is refused now, before any task trains."""
        c = self.cfg
        if c.intrinsic_dim is None:
            return
        n_blocks = len(self.net.backbone.layers)
        smallest = 2 * n_blocks * len(c.lora_targets) * self.net.backbone.num_features * min(
            self.rank(t) for t in range(64))
        if c.intrinsic_dim > smallest:
            raise ConfigError(f"config key 'intrinsic_dim' = {c.intrinsic_dim} exceeds the {smallest:,} LoRA parameters "
                              "of a task's adapter; lower it, or set it to null for plain LoRA")
        if c.allocation_mode == "learned" and c.intrinsic_dim < n_blocks:
            raise ConfigError(f"config key 'intrinsic_dim' = {c.intrinsic_dim}: \"allocation_mode\": \"learned\" splits "
                              f"it over the {n_blocks} blocks; it must be >= {n_blocks}")

    def subspace_spec(self, task: int) -> Optional[SubspaceSpec]:
        """SubLoRA (``intrinsic_dim``): the subspace of task ``task``'s adapter; None: plain LoRA factors."""
        c = self.cfg
        if c.intrinsic_dim is None:
            return None
        return SubspaceSpec(c.intrinsic_dim, c.allocation_mode, c.allocation_ratio,
                            seed=1_000_003 + task_seed(self.seed, task))

    def skip_adapter(self, task: int, reuse: bool) -> None:
        """Task ``task`` keeps no adapter of its own: it leaves the forward pass for good; with ``reuse``
        the latest earlier active adapter trains again in its place (and is saved with this task)."""
        self.gate.prune([task])
        latest = self.latest_adapter_before(task)
        if reuse and latest is not None:
            self.trained_by[task] = latest
            self.net.backbone.reopen(latest)
        else:
            self.net.backbone.configure()

    def latest_adapter_before(self, task: int) -> Optional[int]:
        """The adapter a task without its own would reopen: the latest active one before it."""
        earlier = [t for t in self.gate.active_tasks() if t < task]
        return earlier[-1] if earlier else None

    def served(self, adapter: int) -> int:
        """How many tasks an adapter has trained on: its own and those that reopened it."""
        return 1 + sum(1 for k in self.trained_by.values() if k == adapter)

    def train_task(self, task: int, loader: DataLoader) -> None:
        """Default: one phase training every trainable tensor with the configured optimiser."""
        self.fit(task, loader, self.param_groups(), self.epochs(task), desc=f"Task {task}")

    def end_task(self, task: int) -> None:
        """Freeze the task's adapter: from now on it is one of the stacked, frozen ones."""
        if self.uses_adapters:
            self.net.backbone.freeze_current()

    def epoch_scalars(self) -> dict[str, float]:
        """Method-specific scalars the trackers log after each epoch (``loggers``)."""
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Method-specific tensors saved in each task's checkpoint."""
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
        """One group of every tensor that requires grad (adapter, alphas, head...); a subspace adapter's
        z and split logits in a group of their own when ``subspace_lr`` is set."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        sub = self.net.backbone.subspace if self.uses_adapters else None
        if sub is None or self.cfg.subspace_lr is None:
            return [{"params": params}]
        own = {id(p) for p in sub.parameters()}
        return [{"params": [p for p in params if id(p) not in own]},
                {"params": [p for p in params if id(p) in own], "lr": self.cfg.subspace_lr}]

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
        """Training: shuffled, ``batch_size`` images per step over all processes. With ``seed_per_sample``
        (always under torchrun) the order comes from ``EpochSampler`` and each image's augmentation from
        its own seed, so the images do not depend on workers or processes. Evaluation: in order."""
        seed = task_seed(self.seed, task)
        g = torch.Generator().manual_seed(seed)
        workers = self.cfg.workers
        bs = self.cfg.batch_size // dist.world() if train else (self.cfg.eval_batch_size or 2 * self.cfg.batch_size)
        sampler = None
        if train and self.cfg.seed_per_sample:
            if not isinstance(dataset, TaskDataset):
                raise TypeError("seed_per_sample needs a TaskDataset (use TaskDataset.subset, not torch Subset)")
            dataset.augment_seed = seed
            sampler = EpochSampler(dataset, num_replicas=dist.world(), rank=dist.rank(), shuffle=True, seed=seed)
        if self.augments_on_device(dataset):
            return DeviceLoader(dataset, bs, train, self.device_augment, self.device, g, sampler, workers)
        return DataLoader(dataset, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                          drop_last=False, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, worker_init_fn=_seed_worker, generator=g,
                          prefetch_factor=4 if workers > 0 else None)

    def augments_on_device(self, dataset) -> bool:
        """``augment_on``: "device" always, "auto" for in-memory images; otherwise per image in the DataLoader."""
        in_memory = isinstance(getattr(dataset, "images", None), np.ndarray)
        return self.cfg.augment_on == "device" or (self.cfg.augment_on == "auto" and in_memory)

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
        lo = self.net.head.out_features - self._n_new
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
                logits = self.net(x).float()
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
        return self.gate.active_tasks() if self.uses_adapters else []

    @property
    def metrics(self) -> dict:
        """The run's metrics so far (utils/run_metrics.py), as recorded after each task."""
        return self.book.values

    def record(self, task: int, res: dict, train_s: float, eval_s: float) -> None:
        """Record a task's evaluation and costs, save metrics.json, tell the trackers, log."""
        active = self.active_adapters()
        self.book.record(res, active, self.net.backbone.adapter_param_count(active),
                         train_s, self.task_steps, eval_s)
        m = self.metrics
        split = self.net.backbone.subspace_stored.get(task, {}).get("subspace.split") if self.uses_adapters else None
        if split is not None:  # SubLoRA learned allocation: gamma_l, the share of block l's z that feeds B
            m.setdefault("subspace_gamma", []).append([round(float(g), 4) for g in torch.sigmoid(split)])
            log.info(f"Subspace split of task {task}, gamma per block (share of z on B): {m['subspace_gamma'][-1]}")
        self.book.save()
        self.tracker.task(task, {"task/A": res["total"], "task/old_accuracy": res["old"],
                                 "task/new_accuracy": res["new"], "task/active_adapters": len(active),
                                 "task/train_seconds": train_s})
        self.book.log_task(res, active if self.uses_adapters else None, task)

    def saved_metrics(self) -> dict:
        return self.book.saved()

    def load_metrics(self, saved: dict) -> None:
        self.book.load(saved)

    def headline(self) -> str:
        return self.book.headline()

    def checkpoint_tensors(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s adapter, the whole head and the gate, as plain tensors."""
        t = {"head.weight": self.net.head.weight, "head.bias": self.net.head.bias}
        if self.uses_adapters:
            owner = self.trained_by.get(task, task)  # a task that reopened an earlier adapter saves that one
            if owner in self.net.backbone.subspace_stored:  # SubLoRA: z, seed (and split) rebuild the factors
                t.update(self.net.backbone.subspace_stored[owner])
            else:
                for i, layer in enumerate(self.net.backbone.layers):
                    t[f"adapter.{i}.A"] = layer.lora_A[str(owner)]
                    t[f"adapter.{i}.B"] = layer.lora_B[str(owner)]
            t["adapter.owner"] = torch.tensor(owner)
            t["gate.alpha"] = self.gate.alphas(list(range(self.gate.n_tasks)))
            t["gate.pruning_mask"] = self.gate.pruning_mask
        t.update(self.extra_tensors())
        return t

    def save_task(self, task: int) -> None:
        if self.cfg.save_adapters:
            save_tensors(self.run_dir / f"task_{task}.safetensors", self.checkpoint_tensors(task),
                         metadata={"task": str(task), "model_name": self.cfg.model_name})

    def restore(self, dm: DataManager, done: int) -> None:
        """Rebuild the state after tasks 0..done from a run folder's task checkpoints.

        Structure is replayed (head growth, adapters) and every tensor is loaded; no method
        decision (pruning, ...) is taken again: the last checkpoint's mask and gate are used.
        """
        try:
            self._restore(dm, done)
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the checkpoints in {self.run_dir} do not fit its config.json ({e}); was the "
                                  "config edited, or does the folder hold another run?") from None

    def _restore(self, dm: DataManager, done: int) -> None:
        for task in range(done + 1):
            self._n_new = dm.sizes[task]
            self.begin_task(task, dm.sizes[task])
            ck = load_tensors(self.run_dir / f"task_{task}.safetensors")
            if self.uses_adapters:
                owner = str(int(ck["adapter.owner"])) if "adapter.owner" in ck else str(task)
                if owner != str(task):
                    self.trained_by[task] = int(owner)
                sub = self.net.backbone.subspace
                if ("subspace.z" in ck) != (sub is not None):
                    raise KeyError("subspace.z: the checkpoint and the config disagree on intrinsic_dim")
                if sub is not None:  # the factors are rebuilt from z and the seed, as training wrote them
                    sub.load_stored(ck)
                    self.net.backbone.materialize_subspace()
                else:
                    with torch.no_grad():
                        for i, layer in enumerate(self.net.backbone.layers):
                            layer.lora_A[owner].copy_(ck[f"adapter.{i}.A"])
                            layer.lora_B[owner].copy_(ck[f"adapter.{i}.B"])
                self.gate.current = None
        with torch.no_grad():
            self.net.head.weight.copy_(ck["head.weight"])
            self.net.head.bias.copy_(ck["head.bias"])
            if self.uses_adapters:
                for t, a in enumerate(ck["gate.alpha"]):
                    self.gate.alpha[str(t)].fill_(float(a))
                self.gate.load_mask(ck["gate.pruning_mask"])
                self.load_extra_tensors(ck)
        if self.uses_adapters:
            self.net.backbone.configure()

    # ---- the task loop ---------------------------------------------------------------------------
    def run(self, dm: DataManager, start: int = 0) -> dict:
        """Train and evaluate tasks ``start``..end; metrics.json and checkpoints after every task."""
        try:
            for task in range(start, dm.n_tasks):
                self._run_task(dm, task)
        finally:
            self.tracker.close()
        return self.metrics

    def _run_task(self, dm: DataManager, task: int) -> None:
        """One task: seed, structure, training, evaluation, record, checkpoint."""
        seed_everything(task_seed(self.seed, task))
        lo, hi = dm.task_range(task)
        self._n_new = hi - lo
        log.info(f"Learning on {lo}-{hi} (task {task + 1}/{dm.n_tasks})")
        self.begin_task(task, hi - lo)
        self.task_steps = self.task_epochs = 0
        t0 = time.perf_counter()
        self.train_task(task, self.loader(dm.train_set(task, self.train_tf), train=True, task=task))
        self.end_task(task)
        t1 = time.perf_counter()
        res = self.evaluate(dm, task)
        t2 = time.perf_counter()
        self.record(task, res, t1 - t0, t2 - t1)
        self.save_task(task)
