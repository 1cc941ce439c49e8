"""Batches of an in-memory dataset made on the device (``augment_on: "device"``).

The task's uint8 images are copied to the device once, when the loader is made (``shift_tasks``
applied there); each batch is a gather of those images and one ``DeviceAugment`` call. The order of
the images is the one the DataLoader path gives: a DataLoader over the indices alone, with the same
generator, sampler and batch size, decides it. No worker processes, no per-item Python transform.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.augment import DeviceAugment
from utils.data_manager import EpochSampler, TaskDataset, sample_seed, shift_appearance


class _Keys(Dataset):
    """Item k is k: a DataLoader over it yields the batches of keys (indices, or epoch-tagged keys)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        return k


def device_images(ds: TaskDataset, device: torch.device) -> torch.Tensor:
    """The dataset's images as one uint8 (N, 3, H, W) tensor on ``device``, shifted where flagged."""
    x = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2)
    if ds.shifted is not None and ds.shifted.any():
        x = x.clone()
        for i in np.nonzero(ds.shifted)[0]:
            x[i] = shift_appearance(x[i])
    return x.contiguous().to(device)


class DeviceLoader:
    """An iterable of (x, y) on the device, x already augmented (train) or resized (test)."""

    def __init__(self, dataset: TaskDataset, batch_size: int, train: bool, augment: DeviceAugment,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 sampler: Optional[EpochSampler] = None):
        self.dataset, self.sampler, self.train, self.augment = dataset, sampler, train, augment
        self.images = device_images(dataset, device)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(device)
        self.keys = DataLoader(_Keys(len(dataset)), batch_size=batch_size, shuffle=train and sampler is None,
                               sampler=sampler, generator=generator, num_workers=0)

    def __len__(self) -> int:
        return len(self.keys)

    def _seeds(self, keys: torch.Tensor) -> Optional[np.ndarray]:
        """Each image's own stream (``seed_per_sample``): sample_seed(seed, epoch, index) of its key."""
        seed = self.dataset.augment_seed
        if seed is None or not self.train:
            return None
        n = len(self.dataset)
        return np.array([sample_seed(seed, k // n, k % n) for k in keys.tolist()], dtype=np.uint64)

    def __iter__(self):
        n = len(self.dataset)
        for keys in self.keys:
            idx = (keys % n).to(self.images.device)
            x = self.images.index_select(0, idx)
            x = self.augment.train(x, self._seeds(keys)) if self.train else self.augment.test(x)
            yield x, self.labels.index_select(0, idx)
