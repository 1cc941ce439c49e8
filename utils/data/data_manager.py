"""Class order, task splits and per-task datasets for class-incremental learning (SPEC section 1)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from utils.data.datasets import DataError, SplitData


def class_order(n_classes: int, shuffle: bool, seed: int) -> np.ndarray:
    """The class order: RandomState(seed).permutation(n) with shuffle, else 0..n-1."""
    if not shuffle:
        return np.arange(n_classes)
    return np.random.RandomState(seed).permutation(n_classes)


def task_sizes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """init_cls classes, then increment per task; the last task takes what remains."""
    if init_cls > n_classes:
        raise DataError(f"config key 'init_cls' = {init_cls} asks for more classes than the dataset's "
                        f"{n_classes}; lower it (or check data_path / synthetic_classes)")
    sizes = [init_cls]
    left = n_classes - init_cls
    sizes += [increment] * (left // increment)
    if left % increment:
        sizes.append(left % increment)
    return sizes


def _per_class_subset(y: np.ndarray, k: Optional[int], seed: int) -> np.ndarray:
    """Indices keeping at most k items of each class, chosen by a seeded permutation."""
    if k is None:
        return np.arange(len(y))
    perm = np.random.RandomState(seed).permutation(len(y))
    keep, count = [], {}
    for i in perm:
        c = int(y[i])
        if count.get(c, 0) < k:
            keep.append(i)
            count[c] = count.get(c, 0) + 1
    return np.sort(np.asarray(keep, dtype=np.int64))


def load_image(path: str) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB; a file that cannot be read raises DataError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a broken file
        raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def grey_invert(img: torch.Tensor) -> torch.Tensor:
    """Greyscale (ITU-R 601 luma, rounded), then inverted (255 - v), in all three channels: the colour
    statistics change."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=img.device).view(3, 1, 1)
    luma = (img.float() * w).sum(0).round().clamp(0, 255).to(torch.uint8)
    return (255 - luma).expand(3, *luma.shape).clone()


def rot180(img: torch.Tensor) -> torch.Tensor:
    """Upside down (a half turn): every pixel value and colour kept, so pixel statistics cannot tell it; only
    the layout changes. Any image size."""
    return torch.flip(img, dims=(1, 2))


#: The fixed order of ``patch_shuffle``'s 4 x 4 tiles (a fixed permutation that leaves no tile in place).
TILE_ORDER = (9, 4, 13, 0, 14, 3, 12, 5, 7, 11, 2, 15, 1, 10, 6, 8)


def patch_shuffle(img: torch.Tensor) -> torch.Tensor:
    """The image cut into a 4 x 4 grid of tiles put back in a fixed shuffled order (``TILE_ORDER``): every pixel
    value kept, like rot180, but the layout of the object is lost, which the pretrained features do see. A side
    that 4 does not divide keeps its last (side mod 4) rows or columns in place."""
    c, h, w = img.shape
    th, tw = h // 4, w // 4
    if th == 0 or tw == 0:
        return img.clone()
    grid = img[:, :4 * th, :4 * tw].reshape(c, 4, th, 4, tw).permute(1, 3, 0, 2, 4).reshape(16, c, th, tw)
    out = img.clone()
    out[:, :4 * th, :4 * tw] = grid[list(TILE_ORDER)].reshape(4, 4, c, th, tw).permute(2, 0, 3, 1, 4).reshape(
        c, 4 * th, 4 * tw)
    return out


#: ``shift_kind``: the appearance changes a ``shift_tasks`` stream can show, by name.
SHIFTS = {"grey_invert": grey_invert, "rot180": rot180, "patch_shuffle": patch_shuffle}


def shift_appearance(img: torch.Tensor, kind: str = "grey_invert") -> torch.Tensor:
    """The ``shift_tasks`` appearance change of a uint8 (3, H, W) image. Fixed and strong: the pretrained
    features of a shifted image differ from those of the plain one, while its class stays recognisable."""
    return SHIFTS[kind](img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random stream of one image in one epoch (``seed_per_sample``)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % 2**63


class TaskDataset(Dataset):
    """Images and remapped labels of some classes, with a transform applied per item.

    With ``augment_seed`` set, item keys are ``epoch * len + index`` (as ``EpochSampler`` yields them)
    and the transform of each image draws from its own stream, ``sample_seed(augment_seed, epoch, index)``:
    the images do not depend on the loader's workers or on which process loads them.
    """

    def __init__(self, images, labels: np.ndarray, transform: Callable, augment_seed: Optional[int] = None,
                 shifted: Optional[np.ndarray] = None, shift_kind: str = "grey_invert"):
        self.images, self.labels, self.transform = images, labels, transform
        self.augment_seed = augment_seed
        self.shifted = shifted  # bool per item: shift_appearance before the transform (``shift_tasks``)
        self.shift_kind = shift_kind

    def __len__(self) -> int:
        return len(self.labels)

    def is_shifted(self, i: int) -> bool:
        return self.shifted is not None and bool(self.shifted[i])

    def image(self, i: int) -> torch.Tensor:
        """Item i's uint8 (3, H, W) image before any transform, read from its file if it has one, shifted
        if its task is in ``shift_tasks``."""
        x = self.images[i]
        img = load_image(x) if isinstance(x, str) else torch.from_numpy(x).permute(2, 0, 1)
        return shift_appearance(img, self.shift_kind) if self.is_shifted(i) else img

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), len(self.labels))
        img = self.image(i)
        if self.augment_seed is None:
            return self.transform(img), int(self.labels[i])
        with torch.random.fork_rng(devices=[]):  # the global stream (Gumbel noise, ...) is left as it was
            torch.manual_seed(sample_seed(self.augment_seed, epoch, i))
            return self.transform(img), int(self.labels[i])

    def subset(self, idx) -> "TaskDataset":
        """The items at ``idx``, as a dataset of their own (same transform and seed); ``indices`` says where
        they came from, as in torch's Subset."""
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        shifted = None if self.shifted is None else self.shifted[idx]
        sub = TaskDataset(images, self.labels[idx], self.transform, self.augment_seed, shifted, self.shift_kind)
        sub.indices = idx.tolist()
        return sub


def split_per_class(labels: np.ndarray, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices kept for training and held out: a seeded ``share`` of each class's items (at least one)."""
    rng = np.random.RandomState(seed % 2**32)
    learn, judge = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        k = max(1, round(share * len(idx)))
        judge += idx[:k].tolist()
        learn += idx[k:].tolist()
    return sorted(learn), sorted(judge)


class EpochSampler(DistributedSampler):
    """DistributedSampler (one shard per rank, permutation from seed + epoch) that yields epoch-tagged keys
    ``epoch * len + index`` for a ``TaskDataset`` with ``augment_seed``. With one process it is the whole
    permutation; with N, rank r gets its items r, r + N, ... so that every global batch holds the same
    images as the single-process batch (per-rank batch = batch_size / N)."""

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in super().__iter__())


class DataManager:
    """Splits a dataset into tasks; labels are remapped to positions in the class order."""

    def __init__(self, data: SplitData, init_cls: int, increment: int, shuffle: bool, seed: int,
                 train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                 max_tasks: Optional[int] = None, shift_tasks: Sequence[int] = (), shift_kind: str = "grey_invert"):
        self.order = class_order(data.n_classes, shuffle, seed)
        sizes = task_sizes(data.n_classes, init_cls, increment)
        self.sizes = sizes[:max_tasks] if max_tasks else sizes
        bad = [t for t in shift_tasks if t >= len(sizes)]
        if bad:
            raise DataError(f"config key 'shift_tasks' names task(s) {bad}, but the stream has {len(sizes)} tasks "
                            f"(0..{len(sizes) - 1}); remove them or change init_cls / increment")
        self.shift_tasks = sorted(set(shift_tasks))
        self.shift_kind = shift_kind
        self.class_names = [data.class_names[c] for c in self.order]
        remap = np.empty(data.n_classes, np.int64)
        remap[self.order] = np.arange(data.n_classes)
        tr = _per_class_subset(data.y_train, train_per_class, seed)
        te = _per_class_subset(data.y_test, test_per_class, seed + 1)
        self._train = (self._take(data.x_train, tr), remap[data.y_train[tr]])
        self._test = (self._take(data.x_test, te), remap[data.y_test[te]])

    @classmethod
    def for_config(cls, cfg, data: SplitData, seed: int) -> "DataManager":
        """The task splits a run's config asks for (utils/config keys)."""
        return cls(data, cfg.init_cls, cfg.increment, cfg.shuffle, seed, cfg.train_per_class, cfg.test_per_class,
                   cfg.max_tasks, cfg.shift_tasks, cfg.shift_kind)

    @staticmethod
    def _take(images, idx: np.ndarray):
        return images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]

    @property
    def n_tasks(self) -> int:
        return len(self.sizes)

    def classes_upto(self, t: int) -> int:
        """How many classes are known after task t."""
        return sum(self.sizes[: t + 1])

    def task_range(self, t: int) -> tuple[int, int]:
        """The remapped labels [lo, hi) that task t introduces."""
        return self.classes_upto(t - 1) if t else 0, self.classes_upto(t)

    def _subset(self, split, lo: int, hi: int, transform: Callable) -> TaskDataset:
        images, labels = split
        idx = np.nonzero((labels >= lo) & (labels < hi))[0]
        shifted = None
        if self.shift_tasks:
            shifted = np.isin(self.task_of_label(labels[idx]), self.shift_tasks)
        return TaskDataset(self._take(images, idx), labels[idx], transform, shifted=shifted, shift_kind=self.shift_kind)

    def train_set(self, t: int, transform: Callable) -> TaskDataset:
        """Task t's training images only."""
        return self._subset(self._train, *self.task_range(t), transform)

    def test_set(self, t: int, transform: Callable) -> TaskDataset:
        """Test images of every class seen up to and including task t."""
        return self._subset(self._test, 0, self.classes_upto(t), transform)

    def task_of_label(self, labels: np.ndarray) -> np.ndarray:
        """The task that introduced each remapped label."""
        bounds = np.cumsum(self.sizes)
        return np.searchsorted(bounds, labels, side="right")
