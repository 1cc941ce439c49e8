"""SimpleCIL (Zhou et al., 2023): no training at all; each class is the mean of its training images' features
under the frozen backbone (the test transform, no augmentation), and a test image goes to the class whose
prototype is nearest in cosine similarity.

With ``first_session_adapt`` (APER, Zhou et al. 2023), task 0 first trains one LoRA adapter (``lora_rank``,
``lora_targets``) with a linear head, the config's optimiser and epochs, on the augmented images; the adapter is
then merged into the frozen qkv weights (the trained function, no adapter left in the forward pass) and every
prototype, of every task, is made through the adapted backbone. RanPAC (ranpac.py) shares all of this.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch.utils.data import DataLoader

from backbone.gate import IsolatedGate
from backbone.head import CosineHead, GrowingHead
from models import register
from models.base import Learner
from utils.config import DEFAULTS
from utils.config.schema import _key
from utils.data.data_manager import DataManager

log = logging.getLogger("cl")

#: What SimpleCIL reads only to adapt on task 0 (a log line says so when a config sets them without adapting).
UNUSED = ("epochs", "lrate", "optimizer", "momentum", "weight_decay", "scheduler", "init_epoch", "init_lr")


@dataclasses.dataclass
class PrototypeKeys:
    """SimpleCIL's (and RanPAC's) own config key."""
    first_session_adapt: bool = _key(
        False, "APER: train one LoRA adapter (lora_rank, lora_targets) and a linear head on task 0 with the config's "
        "optimiser and epochs, merge it into the backbone, then make every prototype through it")


def check_adapt_keys(cfg, raw: dict) -> list[str]:
    """lora_rank / lora_targets shape the task-0 adapter: refused when no adapter is trained."""
    return [f"config key '{k}' only applies with \"first_session_adapt\": true; remove it or set that"
            for k in ("lora_rank", "lora_targets") if not cfg.first_session_adapt and k in raw
            and raw[k] != getattr(DEFAULTS, k)]


@torch.no_grad()
def class_means(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """(len(classes), d) mean feature of each class, accumulated in float64."""
    sums = features.new_zeros(len(classes), features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels - classes.start, features.double())
    counts = torch.bincount(labels - classes.start, minlength=len(classes)).clamp_min(1)
    return sums / counts[:, None]


@register("simplecil", keys=PrototypeKeys, uses=("lora_rank", "lora_targets"), check=check_adapt_keys)
class SimpleCIL(Learner):
    """The growing head's rows are the class prototypes; the backbone keeps no adapter in its forward pass."""

    def make_gate(self, n_layers: int) -> IsolatedGate:
        return IsolatedGate(n_layers)  # the task-0 adapter, if any, with w = 1 while it trains

    def make_head(self, n_features: int) -> CosineHead:
        return CosineHead(n_features)

    @property
    def adapts(self) -> bool:
        return self.cfg.first_session_adapt

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        self.net.head.to(self.device)
        if task == 0 and self.adapts:
            self.net.backbone.add_task(0, self.rank(0), 1.0)
            self.net.to(self.device)
        if task == 0 and not self.adapts:
            set_away = [k for k in UNUSED if getattr(self.cfg, k) != getattr(DEFAULTS, k)]
            if set_away:
                log.info(f"{self.name} trains nothing (first_session_adapt false): {', '.join(set_away)} are not used")

    def train_loader(self, dm: DataManager, task: int) -> DataLoader:
        """The task's training images with the test transform, in order: what the prototypes are made of (and,
        for the adaptation on task 0, the augmented shuffled loader beside it)."""
        if task == 0 and self.adapts:
            self._adapt_loader = super().train_loader(dm, task)
        return self.loader(dm.train_set(task, self.test_tf), train=False, task=task)

    def adapt(self, task: int) -> None:
        """Task 0's adapter, trained with a linear head of its own (the prototype head stays aside)."""
        head = self.net.head
        self.net.head = GrowingHead(self.net.backbone.num_features).to(self.device)
        self.net.head.expand(self.n_new)
        self.net.head.to(self.device)
        try:
            self.fit(task, self._adapt_loader, self.param_groups(), self.epochs(task), desc=f"Task {task} adaptation")
        finally:
            self.net.head, self._adapt_loader = head, None
        self.merge_adapter()

    @torch.no_grad()
    def merge_adapter(self) -> None:
        """W += B_0 A_0 in every adapted block (its weight is 1), and the adapter leaves the forward pass."""
        for layer in self.net.backbone.layers:
            layer.fold_into_base(0)
        self.net.backbone.freeze_current()  # IsolatedGate: a frozen adapter takes no part

    def restore(self, dm: DataManager, done: int) -> None:
        super().restore(dm, done)
        if self.adapts:  # the saved adapter, merged again as training merged it
            self.merge_adapter()

    @torch.no_grad()
    def features(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        feats, labels = [], []
        for x, y in loader:
            with self._autocast():
                feats.append(self.net.backbone(x.to(self.device, non_blocking=True)).float())
            labels.append(y.to(self.device))
        return torch.cat(feats), torch.cat(labels)

    def train_task(self, task: int, loader: DataLoader) -> None:
        if task == 0 and self.adapts:
            self.adapt(task)
        self.set_classifier(task, loader)

    @torch.no_grad()
    def set_classifier(self, task: int, loader: DataLoader) -> None:
        """The new classes' rows: their prototypes."""
        hi = self.net.head.out_features
        classes = range(hi - self.n_new, hi)
        f, y = self.features(loader)
        self.net.head.weight[classes.start:] = class_means(f, y, classes).to(self.net.head.weight.dtype)
        self.net.head.bias.zero_()
