"""Batches augmented on the device (``augment_on: "device"``).

In-memory datasets: the task's uint8 images are copied to the device once, when the loader is made
(``shift_tasks`` applied there); each batch is a gather of those images and one ``DeviceAugment`` call,
with no worker process and no per-item Python transform. Image files: the workers read them (and
decode them, except JPEGs on CUDA, which are decoded on the GPU in one batched call); a batch of
different sizes is padded, and each image's own size bounds its crop. The order of the images is the
one the DataLoader path gives: a DataLoader with the same generator, sampler and batch size decides it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.data.augment import DeviceAugment
from utils.data.data_manager import EpochSampler, TaskDataset, sample_seed, shift_appearance

JPEG = (".jpg", ".jpeg")


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
            x[i] = ds.image(i)
    return x.contiguous().to(device)


class _Files(Dataset):
    """Item k: (the image of key k, as uint8 (3, H, W), or its JPEG bytes with ``encoded``; label; key)."""

    def __init__(self, ds: TaskDataset, encoded: bool):
        self.ds, self.encoded = ds, encoded

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int):
        i = int(key) % len(self.ds)
        if self.encoded:
            from torchvision.io import read_file
            img = read_file(self.ds.images[i])
        else:
            img = self.ds.image(i)
        return img, int(self.ds.labels[i]), int(key)


def _collate(items):
    images, labels, keys = zip(*items)
    return list(images), torch.tensor(labels), torch.tensor(keys)


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes in one zero-padded (N, 3, H_max, W_max) uint8 tensor, and their sizes (N, 2)."""
    sizes = torch.tensor([im.shape[1:] for im in images], device=images[0].device)
    out = images[0].new_zeros(len(images), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    for k, im in enumerate(images):
        out[k, :, :im.shape[1], :im.shape[2]] = im
    return out, sizes


class DeviceLoader:
    """An iterable of (x, y) on the device, x already augmented (train) or resized (test)."""

    def __init__(self, dataset: TaskDataset, batch_size: int, train: bool, augment: DeviceAugment,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 sampler: Optional[EpochSampler] = None, workers: int = 0):
        self.dataset, self.sampler, self.train, self.augment = dataset, sampler, train, augment
        self.device = device
        self.files = not isinstance(dataset.images, np.ndarray)
        if self.files:  # workers read (and decode) the files; JPEGs on CUDA are decoded on the GPU
            self.gpu_decode = device.type == "cuda" and all(str(p).lower().endswith(JPEG) for p in dataset.images)
            self.keys = DataLoader(_Files(dataset, self.gpu_decode), batch_size=batch_size,
                                   shuffle=train and sampler is None, sampler=sampler, generator=generator,
                                   num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                                   prefetch_factor=4 if workers > 0 else None, pin_memory=device.type == "cuda")
            return
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

    def _file_batches(self):
        from torchvision.io import ImageReadMode, decode_jpeg
        for images, labels, keys in self.keys:
            if self.gpu_decode:
                images = decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device)
                ds = self.dataset
                images = [shift_appearance(im, ds.shift_kind) if ds.is_shifted(k % len(ds)) else im
                          for im, k in zip(images, keys.tolist())]
            else:
                images = [im.to(self.device, non_blocking=True) for im in images]
            x, sizes = pad_batch(images)
            x = self.augment.train(x, self._seeds(keys), sizes) if self.train else self.augment.test(x, sizes)
            yield x, labels.to(self.device, non_blocking=True)

    def __iter__(self):
        if self.files:
            yield from self._file_batches()
            return
        n = len(self.dataset)
        for keys in self.keys:
            idx = (keys % n).to(self.images.device)
            x = self.images.index_select(0, idx)
            x = self.augment.train(x, self._seeds(keys)) if self.train else self.augment.test(x)
            yield x, self.labels.index_select(0, idx)
