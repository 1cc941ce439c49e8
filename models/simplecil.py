"""SimpleCIL (Zhou et al., 2023): no training at all; each class is the mean of its training images' features
under the frozen backbone (the test transform, no augmentation), and a test image goes to the class whose
prototype is nearest in cosine similarity."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from backbone.head import CosineHead
from models import register
from models.base import Learner
from utils.config import DEFAULTS
from utils.data.data_manager import DataManager

log = logging.getLogger("cl")

#: What SimpleCIL never reads: it trains nothing (a log line says so when a config sets them).
UNUSED = ("epochs", "lrate", "optimizer", "momentum", "weight_decay", "scheduler", "init_epoch", "init_lr")


@torch.no_grad()
def class_means(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """(len(classes), d) mean feature of each class, accumulated in float64."""
    sums = features.new_zeros(len(classes), features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels - classes.start, features.double())
    counts = torch.bincount(labels - classes.start, minlength=len(classes)).clamp_min(1)
    return sums / counts[:, None]


@register("simplecil")
class SimpleCIL(Learner):
    """The growing head's rows are the class prototypes; the backbone keeps no adapter."""

    def make_head(self, n_features: int) -> CosineHead:
        return CosineHead(n_features)

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        self.net.head.to(self.device)
        if task == 0:
            set_away = [k for k in UNUSED if getattr(self.cfg, k) != getattr(DEFAULTS, k)]
            if set_away:
                log.info(f"simplecil trains nothing: {', '.join(set_away)} are not used")

    def train_loader(self, dm: DataManager, task: int) -> DataLoader:
        """The task's training images with the test transform, in order: what the prototypes are made of."""
        return self.loader(dm.train_set(task, self.test_tf), train=False, task=task)

    @torch.no_grad()
    def features(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        feats, labels = [], []
        for x, y in loader:
            with self._autocast():
                feats.append(self.net.backbone(x.to(self.device, non_blocking=True)).float())
            labels.append(y.to(self.device))
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def train_task(self, task: int, loader: DataLoader) -> None:
        hi = self.net.head.out_features
        classes = range(hi - self.n_new, hi)
        f, y = self.features(loader)
        self.net.head.weight[classes.start:] = class_means(f, y, classes).to(self.net.head.weight.dtype)
        self.net.head.bias.zero_()
