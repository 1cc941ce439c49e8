"""SimpleCIL (Zhou et al., 2023): no training at all; each class is the mean of its training images' features
under the frozen backbone (the test transform, no augmentation), and a test image goes to the class whose
prototype is nearest in cosine similarity: the learner that trains nothing, under the ``"ncm"`` statistics head
(models/heads.py). Any other statistics head may be set (``head``); RanPAC (ranpac.py) is this learner under the
``"ridge"`` head.

With ``first_session_adapt`` (APER, Zhou et al. 2023), task 0 first trains one LoRA adapter (``lora_rank``,
``lora_targets``) with a linear head, the config's optimiser and epochs, on the augmented images; the adapter is
then merged into the frozen qkv weights (the trained function, no adapter left in the forward pass) and every
class's statistics, of every task, are taken through the adapted backbone.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch.utils.data import DataLoader

from backbone.gate import IsolatedGate
from models import register
from models.base import Learner
from models.heads import class_means  # noqa: F401  (the prototypes' maths, where readers of SimpleCIL look)
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
        "optimiser and epochs, merge it into the backbone, then take every class's statistics through it")


def check_adapt_keys(cfg, raw: dict) -> list[str]:
    """lora_rank / lora_targets shape the task-0 adapter: refused when no adapter is trained."""
    return [f"config key '{k}' only applies with \"first_session_adapt\": true; remove it or set that"
            for k in ("lora_rank", "lora_targets") if not cfg.first_session_adapt and k in raw
            and raw[k] != getattr(DEFAULTS, k)]


@register("simplecil", keys=PrototypeKeys, uses=("lora_rank", "lora_targets"), check=check_adapt_keys)
class SimpleCIL(Learner):
    """Trains nothing (or task 0's adapter, merged); the statistics head classifies. The network's linear head
    only serves the adaptation on task 0."""

    def make_gate(self, n_layers: int) -> IsolatedGate:
        return IsolatedGate(n_layers)  # the task-0 adapter, if any, with w = 1 while it trains

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

    def train_task(self, task: int, loader: DataLoader) -> None:
        """Task 0's adapter and the linear head with it (first_session_adapt), merged; else nothing."""
        if task == 0 and self.adapts:
            self.fit(task, loader, self.param_groups(), self.epochs(task), desc=f"Task {task} adaptation")
            self.merge_adapter()

    @torch.no_grad()
    def merge_adapter(self) -> None:
        """W += B_0 A_0 in every adapted block (its weight is 1), and the adapter leaves the forward pass."""
        for layer in self.net.backbone.layers:
            layer.fold_into_base(0)
        self.net.backbone.freeze_current()  # IsolatedGate: a frozen adapter takes no part

    def restore_network(self, dm: DataManager, done: int) -> None:
        super().restore_network(dm, done)
        if self.adapts:  # the saved adapter, merged again as training merged it
            self.merge_adapter()
