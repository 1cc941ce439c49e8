"""ImageFolder datasets: data_path/train/<class>/*.jpg and data_path/test/<class>/*.jpg, read as file lists."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.split import DataError, SplitData

FOLDER_LAYOUT = """expected an ImageFolder layout:
  {p}/train/<class_name>/*.jpg
  {p}/test/<class_name>/*.jpg"""


IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def _scan(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (folder / c).iterdir() if f.suffix in IMG_EXT) if (folder / c).is_dir() else []
        paths += [str(f) for f in files]
        labels += [i] * len(files)
    return paths, np.asarray(labels, np.int64)


def load_image_folder(data_path: str) -> SplitData:
    """An ImageFolder dataset with data_path/train and data_path/test sharing class folder names."""
    p = Path(data_path)
    if not (p / "train").is_dir() or not (p / "test").is_dir():
        raise DataError(f"no dataset found at '{data_path}'; " + FOLDER_LAYOUT.format(p=data_path))
    classes = sorted(d.name for d in (p / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"'{p / 'train'}' has no class folders; " + FOLDER_LAYOUT.format(p=data_path))
    x_tr, y_tr = _scan(p / "train", classes)
    x_te, y_te = _scan(p / "test", classes)
    return SplitData(x_tr, y_tr, x_te, y_te, classes)
