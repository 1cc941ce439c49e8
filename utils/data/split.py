"""What a loaded dataset is: train/test images with labels and class names, and the error a source raises."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

Images = Union[np.ndarray, list]  # uint8 (N, H, W, 3) in memory, or a list of file paths


@dataclass
class SplitData:
    x_train: Images
    y_train: np.ndarray
    x_test: Images
    y_test: np.ndarray
    class_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


class DataError(FileNotFoundError):
    """A dataset that cannot be found or read; the message shows the layout that was expected."""
