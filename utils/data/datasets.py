"""Dataset sources: CIFAR-100 (torchvision folder, .npz or download), a generated set, and the registry that
picks a loader by ``dataset``; ImageFolder sets are read in folders.py, the benchmarks' own layouts
(ImageNet-R/-A split folders, DomainNet lists, CUB files) in layouts.py.

Each loader returns a ``SplitData`` (split.py): train/test images (uint8 HWC arrays, or image file paths)
with integer labels in the dataset's own class order. Task splitting happens in data_manager.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from utils.data.folders import load_image_folder
from utils.data.layouts import check_classes, check_images, load_cub, load_domainnet, load_split_folder
from utils.data.split import DataError, SplitData  # noqa: F401  (DataError: callers import it from here)

CIFAR_LAYOUT = """expected one of:
  {p}/cifar-100-python/{{train,test,meta}}   (torchvision's folder)
  {p}  as an .npz file, or {p}/*.npz, with x_train, y_train, x_test, y_test (uint8 NHWC, int labels)
or set "download": true to let torchvision fetch it into {p}"""

def _load_npz(path: Path) -> SplitData:
    try:
        z = np.load(path, allow_pickle=False)
        x_tr, y_tr, x_te, y_te = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        names = [str(n) for n in z["fine_label_names"]] if "fine_label_names" in z.files else None
    except Exception as e:  # KeyError, ValueError, OSError, EOFError (empty), BadZipFile (cut short), ...
        raise DataError(f"'{path}' is not a readable CIFAR .npz ({type(e).__name__}: {e}); "
                        "it needs x_train, y_train, x_test, y_test") from None
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise DataError(f"'{path}': x_{name} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"'{path}': y_{name} must be {len(x)} integer labels (one per image of x_{name}), "
                            f"got {y.dtype} {y.shape}")
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise DataError(f"'{path}': x_train images are {x_tr.shape[1:]}, x_test images {x_te.shape[1:]}")
    n = int(max(y_tr.max(), y_te.max())) + 1
    lo = int(min(y_tr.min(), y_te.min()))
    if lo < 0 or (names and n > len(names)):
        raise DataError(f"'{path}': labels must lie in 0..{(len(names) if names else n) - 1}, found "
                        f"{lo}..{n - 1}")
    if len(np.unique(y_tr)) != n:
        raise DataError(f"'{path}': y_train has {len(np.unique(y_tr))} distinct labels but its largest is {n - 1}; "
                        "labels must be 0..C-1 with every class present")
    return SplitData(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), names or [str(i) for i in range(n)])


def _load_torchvision_cifar(root: Path, download: bool) -> SplitData:
    from torchvision.datasets import CIFAR100
    try:
        tr = CIFAR100(str(root), train=True, download=download)
        te = CIFAR100(str(root), train=False, download=download)
    except Exception as e:  # a damaged folder: RuntimeError (checksum), UnpicklingError, EOFError; no network
        what = "could not be downloaded into" if download else "is damaged in"
        raise DataError(f"CIFAR-100 {what} '{root / 'cifar-100-python'}' ({type(e).__name__}: {e}); "
                        + ("check the network, or give data_path" if download else
                           "remove that folder and download it again (\"download\": true), or give data_path")) from None
    return SplitData(tr.data, np.asarray(tr.targets, np.int64), te.data, np.asarray(te.targets, np.int64),
                     list(tr.classes))


def load_cifar100(data_path: str, download: bool) -> SplitData:
    """CIFAR-100 from an .npz file, a folder holding one, a torchvision folder, or a download."""
    p = Path(data_path)
    if p.is_file():
        return _load_npz(p)
    if p.is_dir():
        if (p / "cifar-100-python").is_dir():
            return _load_torchvision_cifar(p, download=False)
        if p.name == "cifar-100-python" and (p / "train").is_file():
            return _load_torchvision_cifar(p.parent, download=False)
        npz = sorted(p.glob("*.npz"))
        if len(npz) == 1:
            return _load_npz(npz[0])
    if download:
        p.mkdir(parents=True, exist_ok=True)
        return _load_torchvision_cifar(p, download=True)
    raise DataError(f"no CIFAR-100 found at '{data_path}'; " + CIFAR_LAYOUT.format(p=data_path))


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """One of ten binary patterns on a grid: shapes and textures that a small ViT can tell apart."""
    dy, dx = yy - cy, xx - cx
    d = np.sqrt(dy ** 2 + dx ** 2)
    period = max(r / 2, 2.0)
    masks = [
        d < r,                                                   # disc
        (np.abs(dy) < r * 0.8) & (np.abs(dx) < r * 0.8),         # square
        (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2),      # triangle
        (d < r) & (d > r * 0.55),                                # ring
        (np.abs(dy) < r / 3) | (np.abs(dx) < r / 3),             # cross
        (yy // period) % 2 == 0,                                 # horizontal stripes
        (xx // period) % 2 == 0,                                 # vertical stripes
        ((yy + xx) // period) % 2 == 0,                          # diagonal stripes
        ((yy // period) + (xx // period)) % 2 == 0,              # checkerboard
        np.abs(dy) + np.abs(dx) < r,                             # diamond
    ]
    return masks[kind % len(masks)]


def make_synthetic(n_classes: int, train_per_class: int, test_per_class: int, size: int, seed: int) -> SplitData:
    """Coloured shapes and textures, one (pattern, colour) pair per class, jittered per image.

    Deterministic from ``seed``; images are uint8 (N, size, size, 3), generated in memory.
    """
    rng = np.random.RandomState(seed)
    colours = rng.uniform(0.25, 1.0, size=(n_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def draw(c: int, n: int) -> np.ndarray:
        out = np.empty((n, size, size, 3), np.uint8)
        for i in range(n):
            cy, cx = rng.uniform(0.35, 0.65, size=2) * size
            r = rng.uniform(0.22, 0.34) * size
            mask = _shape_mask(c, yy, xx, cy, cx, r)[..., None]
            fg = np.clip(colours[c] + rng.normal(0, 0.05, 3), 0, 1)
            bg = rng.uniform(0.0, 0.3, 3)
            img = np.where(mask, fg, bg) + rng.normal(0, 0.04, (size, size, 3))
            out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        return out

    x_tr = np.concatenate([draw(c, train_per_class) for c in range(n_classes)])
    x_te = np.concatenate([draw(c, test_per_class) for c in range(n_classes)])
    y_tr = np.repeat(np.arange(n_classes), train_per_class)
    y_te = np.repeat(np.arange(n_classes), test_per_class)
    return SplitData(x_tr, y_tr, x_te, y_te, [f"pattern{c}" for c in range(n_classes)])


#: Where each dataset is read from when data_path is null (relative to the directory a run starts in; a run
#: folder's config.json stores the absolute path). The generated set has no files.
DEFAULT_PATHS = {"cifar100": "data/cifar100", "cifar224": "data/cifar100", "imagenetr": "data/imagenetr",
                 "imageneta": "data/imageneta", "cub": "data/cub", "domainnet": "data/domainnet"}


def _cifar(cfg) -> SplitData:
    return load_cifar100(cfg.data_path or DEFAULT_PATHS[cfg.dataset], cfg.download)


def _split_folder(cfg) -> SplitData:
    return load_split_folder(cfg.data_path or DEFAULT_PATHS[cfg.dataset], cfg.dataset)


def _domainnet(cfg) -> SplitData:
    return load_domainnet(cfg.data_path or DEFAULT_PATHS["domainnet"])


def _cub(cfg) -> SplitData:
    """CUB-200-2011's own files, or (PILOT's copy) train/test class folders."""
    path = cfg.data_path or DEFAULT_PATHS["cub"]
    if (Path(path) / "train").is_dir() and (Path(path) / "test").is_dir():
        return load_image_folder(path)
    return load_cub(path)


def _synthetic(cfg) -> SplitData:
    return make_synthetic(cfg.synthetic_classes, cfg.train_per_class or 100, cfg.test_per_class or 40,
                          size=32, seed=cfg.seeds[0])


#: dataset name -> loader(cfg); new datasets register here.
DATASETS: dict[str, Callable] = {
    "cifar100": _cifar, "cifar224": _cifar, "synthetic": _synthetic,
    "imagenetr": _split_folder, "imageneta": _split_folder, "cub": _cub, "domainnet": _domainnet,
}


def load_dataset(cfg) -> SplitData:
    """Load the configured dataset through the registry above, then check its class count and files."""
    data = DATASETS[cfg.dataset](cfg)
    check_classes(data, cfg.expected_classes, cfg.data_path or DEFAULT_PATHS.get(cfg.dataset, cfg.dataset))
    check_images(data, cfg.check_images)
    return data
