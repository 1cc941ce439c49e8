"""The data loaders of a task: training (shuffled, per-process share of the batch) and evaluation (in order),
with images augmented in the DataLoader workers or on the device (``augment_on``)."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils import dist
from utils.data.augment import DeviceAugment
from utils.config import Config
from utils.data.data_manager import EpochSampler, TaskDataset
from utils.data.device_loader import DeviceLoader


def _seed_worker(_: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def augments_on_device(cfg: Config, dataset) -> bool:
    """``augment_on``: "device" always, "auto" for in-memory images; otherwise per image in the DataLoader."""
    in_memory = isinstance(getattr(dataset, "images", None), np.ndarray)
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and in_memory)


def make_loader(cfg: Config, dataset, train: bool, seed: int, device: torch.device,
                device_augment: DeviceAugment):
    """Training: shuffled, ``batch_size`` images per step over all processes. With ``seed_per_sample``
    (always under torchrun) the order comes from ``EpochSampler`` and each image's augmentation from
    its own seed, so the images do not depend on workers or processes. Evaluation: in order. ``seed``
    (the task's) seeds the order."""
    g = torch.Generator().manual_seed(seed)
    workers = cfg.workers
    bs = cfg.batch_size // dist.world() if train else (cfg.eval_batch_size or 2 * cfg.batch_size)
    sampler = None
    if train and cfg.seed_per_sample:
        if not isinstance(dataset, TaskDataset):
            raise TypeError("seed_per_sample needs a TaskDataset (use TaskDataset.subset, not torch Subset)")
        dataset.augment_seed = seed
        sampler = EpochSampler(dataset, num_replicas=dist.world(), rank=dist.rank(), shuffle=True, seed=seed)
    if augments_on_device(cfg, dataset):
        return DeviceLoader(dataset, bs, train, device_augment, device, g, sampler, workers)
    return DataLoader(dataset, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=False, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker, generator=g,
                      prefetch_factor=4 if workers > 0 else None)
