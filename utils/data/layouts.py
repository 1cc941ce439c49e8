"""The benchmark datasets as the field lays them out, read into a ``SplitData`` of image paths.

- ImageNet-R / ImageNet-A: ``data_path/train/<class>/`` and ``data_path/test/<class>/`` (the split folders the
  published code and PILOT read); a raw download is split once by ``python -m utils.data.prepare_split``.
- DomainNet: the dataset's own list files ``data_path/<domain>_{train,test}.txt`` of ``path label`` lines,
  paths relative to ``data_path``, for the six domains.
- CUB-200-2011: its own ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``.

Every error names the file or folder that is missing or wrong; nothing here reads pixels (``check_images``).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from utils.data.folders import load_image_folder
from utils.data.split import DataError, SplitData

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def load_split_folder(data_path: str, name: str) -> SplitData:
    """ImageNet-R / -A as train/test class folders; a folder of class folders alone is a raw download."""
    p = Path(data_path)
    if p.is_dir() and not (p / "train").is_dir() and any(d.is_dir() and re.fullmatch(r"n\d{8}", d.name)
                                                         for d in p.iterdir()):
        raise DataError(f"'{data_path}' holds the raw {name} class folders, not a train/test split; split it once "
                        f"with: python -m utils.data.prepare_split --src {data_path} --dst data/{name}  "
                        f"(then set data_path to data/{name})")
    data = load_image_folder(data_path)
    test_classes = sorted(d.name for d in (p / "test").iterdir() if d.is_dir())
    extra = sorted(set(test_classes) - set(data.class_names))
    if extra:
        raise DataError(f"'{p / 'test'}' has class folders that '{p / 'train'}' lacks: {extra[:5]}")
    empty = [c for i, c in enumerate(data.class_names) if not np.any(data.y_train == i)]
    if empty:
        raise DataError(f"'{p / 'train'}' has class folders without images: {empty[:5]}")
    return data


def _read_list(path: Path, root: Path) -> tuple[list[str], np.ndarray]:
    """``path label`` lines (DomainNet's list files), paths relative to root."""
    if not path.is_file():
        raise DataError(f"DomainNet list file '{path}' is missing; data_path must hold the six domains' folders "
                        f"and their list files <domain>_train.txt / <domain>_test.txt (from the DomainNet site)")
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"'{path}' line {n}: expected 'relative/path.jpg label', got {line.strip()!r}")
        paths.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, np.int64)


def load_domainnet(data_path: str) -> SplitData:
    """DomainNet from its list files, every domain's train (and test) lines in one split."""
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"no DomainNet folder at '{data_path}'")
    split = {}
    for part in ("train", "test"):
        lists = [_read_list(root / f"{d}_{part}.txt", root) for d in DOMAINS]
        split[part] = (sum((x for x, _ in lists), []), np.concatenate([y for _, y in lists]))
    (x_tr, y_tr), (x_te, y_te) = split["train"], split["test"]
    n = int(max(y_tr.max(), y_te.max())) + 1
    if min(y_tr.min(), y_te.min()) < 0 or len(np.unique(y_tr)) != n:
        raise DataError(f"DomainNet lists in '{data_path}': labels must be 0..C-1 with every class in the train "
                        f"lists; found {len(np.unique(y_tr))} train classes, largest label {n - 1}")
    names = {}
    for path, y in zip(x_tr, y_tr):
        names.setdefault(int(y), Path(path).parent.name)
    return SplitData(x_tr, y_tr, x_te, y_te, [names.get(c, str(c)) for c in range(n)])


def _cub_table(root: Path, name: str) -> list[list[str]]:
    path = root / name
    if not path.is_file():
        raise DataError(f"CUB-200 file '{path}' is missing; data_path must be the CUB_200_2011 folder (images/, "
                        f"{', '.join(CUB_FILES)})")
    rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) != 2), None)
    if bad:
        raise DataError(f"'{path}' line {bad}: expected two fields")
    return rows


def load_cub(data_path: str) -> SplitData:
    """CUB-200-2011 with its own train/test split (train_test_split.txt: 1 = train)."""
    root = Path(data_path)
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    images = dict(_cub_table(root, "images.txt"))
    labels = {k: int(v) - 1 for k, v in _cub_table(root, "image_class_labels.txt")}
    is_train = {k: v.strip() == "1" for k, v in _cub_table(root, "train_test_split.txt")}
    classes = [v.strip() for _, v in sorted(_cub_table(root, "classes.txt"), key=lambda r: int(r[0]))]
    missing = sorted(set(images) - set(labels) | set(images) - set(is_train))
    if missing:
        raise DataError(f"CUB-200 in '{root}': image ids {missing[:5]} of images.txt have no label or no split")
    out = {True: ([], []), False: ([], [])}
    for k in sorted(images, key=int):
        xs, ys = out[is_train[k]]
        xs.append(str(root / "images" / images[k].strip()))
        ys.append(labels[k])
    (x_tr, y_tr), (x_te, y_te) = ((x, np.asarray(y, np.int64)) for x, y in (out[True], out[False]))
    if len(np.unique(y_tr)) != len(classes) or y_tr.min() < 0 or y_tr.max() >= len(classes):
        raise DataError(f"CUB-200 in '{root}': the train split holds {len(np.unique(y_tr))} of the "
                        f"{len(classes)} classes of classes.txt")
    return SplitData(x_tr, y_tr, x_te, y_te, classes)


def _check_one(path: str, decode: bool) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as im:
            if decode:
                im.convert("RGB")  # converting reads every pixel
        return None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for a bad file
        return f"{path} ({type(e).__name__}: {e})"


def check_images(data: SplitData, mode: str, threads: int = 8) -> None:
    """Open every image file before training ("open": its header; "decode": all its pixels), so that a missing
    or broken file stops the run up front, named, instead of in the middle of a task."""
    if mode == "none" or isinstance(data.x_train, np.ndarray):
        return
    paths = list(data.x_train) + list(data.x_test)
    with ThreadPoolExecutor(threads) as pool:
        bad = [b for b in pool.map(lambda p: _check_one(p, mode == "decode"), paths, chunksize=256) if b]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} image file(s) cannot be read: {'; '.join(bad[:3])}{more}; fix or remove them "
                        "(check_images: \"none\" skips this check)")


def check_classes(data: SplitData, expected: int | None, data_path: str) -> None:
    """The benchmark's class count (``expected_classes``): a folder with a class too few is not the benchmark."""
    if expected is not None and data.n_classes != expected:
        raise DataError(f"'{data_path}' has {data.n_classes} classes, but config key 'expected_classes' says "
                        f"{expected}; check the dataset (a class folder or list lines missing?) or set "
                        "expected_classes to null")
