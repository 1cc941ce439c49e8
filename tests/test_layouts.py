"""The benchmarks' dataset layouts on small generated trees: ImageNet-R/-A split folders (and the command that
splits a raw download), DomainNet list files, CUB-200's own files; each benchmark config runs one task."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from main import main
from tests.conftest import ROOT, TINY
from utils.config import load_config
from utils.data.datasets import DataError, load_dataset
from utils.data.layouts import DOMAINS, load_cub, load_domainnet, load_split_folder
from utils.data.prepare_split import SplitError, plan, prepare


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(value)
    Image.fromarray(rng.randint(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)


def raw_tree(root: Path, classes: int, per_class: int) -> Path:
    """An ImageNet-R style raw download: synset folders of images."""
    for c in range(classes):
        for i in range(per_class):
            _png(root / f"n{c:08d}" / f"img_{i}.png", c * 100 + i)
    return root


def domainnet_tree(root: Path, classes: int) -> Path:
    """Every domain with one train and one test image per class, and the list files."""
    for d in DOMAINS:
        for part in ("train", "test"):
            lines = []
            for c in range(classes):
                rel = f"{d}/class_{c:03d}/{d}_{c}_{part}.png"
                _png(root / rel, c)
                lines.append(f"{rel} {c}")
            (root / f"{d}_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


def cub_tree(root: Path, classes: int, per_class: int = 3) -> Path:
    """CUB_200_2011's files: images/, images.txt, image_class_labels.txt, train_test_split.txt, classes.txt."""
    cub = root / "CUB_200_2011"
    imgs, labels, split = [], [], []
    k = 0
    for c in range(classes):
        for i in range(per_class):
            k += 1
            rel = f"{c + 1:03d}.Bird_{c}/Bird_{c}_{i}.png"
            _png(cub / "images" / rel, k)
            imgs.append(f"{k} {rel}")
            labels.append(f"{k} {c + 1}")
            split.append(f"{k} {1 if i < per_class - 1 else 0}")
    for name, rows in (("images.txt", imgs), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                       ("classes.txt", [f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(classes)])):
        (cub / name).write_text("\n".join(rows) + "\n")
    return root


def test_split_equals_random_split_after_manual_seed(tmp_path):
    """The published code splits with random_split after torch.manual_seed(seed): same permutation here."""
    from torchvision.datasets import ImageFolder
    src = raw_tree(tmp_path / "raw", classes=3, per_class=7)
    rec = plan(src, seed=1993, test_fraction=0.2)
    ds = ImageFolder(str(src))
    torch.manual_seed(1993)
    n_tr = int(0.8 * len(ds))
    tr, te = torch.utils.data.random_split(ds, [n_tr, len(ds) - n_tr])
    rel = lambda i: str(Path(ds.samples[i][0]).relative_to(src))  # noqa: E731
    assert rec["train"] == [rel(i) for i in tr.indices] and rec["test"] == [rel(i) for i in te.indices]
    assert plan(src, seed=1994, test_fraction=0.2)["train"] != rec["train"]


def test_prepare_split_writes_once_and_loads(tmp_path, capsys):
    src = raw_tree(tmp_path / "raw", classes=4, per_class=5)
    with pytest.raises(DataError, match="prepare_split --src"):  # the raw download is not a split
        load_split_folder(str(src), "imagenetr")
    dst = tmp_path / "imagenetr"
    rec = prepare(src, dst, seed=3)
    assert (rec["n_train"], rec["n_test"]) == (16, 4) and not (tmp_path / "imagenetr.partial").exists()
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.png"))
    assert files == sorted([f"train/{r}" for r in rec["train"]] + [f"test/{r}" for r in rec["test"]])
    assert all((dst / "train" / r).resolve() == (src / r).resolve() for r in rec["train"])  # symlinks
    prepare(src, dst, seed=3)  # again: found, unchanged
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SplitError, match="another split"):
        prepare(src, dst, seed=4)
    data = load_split_folder(str(dst), "imagenetr")
    assert len(data.x_train) == 16 and len(data.x_test) == 4 and data.class_names == sorted(
        p.name for p in src.iterdir())


def test_split_folder_errors_name_the_folder(tmp_path):
    root = tmp_path / "ina"
    _png(root / "train" / "a" / "0.png", 0)
    _png(root / "test" / "a" / "0.png", 1)
    _png(root / "test" / "b" / "0.png", 2)
    with pytest.raises(DataError, match=r"test' has class folders that .* lacks: \['b'\]"):
        load_split_folder(str(root), "imageneta")
    with pytest.raises(DataError, match="no dataset found at"):
        load_split_folder(str(tmp_path / "missing"), "imageneta")


def test_domainnet_lists(tmp_path):
    root = domainnet_tree(tmp_path / "dn", classes=3)
    data = load_domainnet(str(root))
    assert len(data.x_train) == len(data.x_test) == 6 * 3
    assert data.class_names == ["class_000", "class_001", "class_002"]
    assert sorted(np.bincount(data.y_train).tolist()) == [6, 6, 6]
    assert all(Path(p).is_file() for p in data.x_train)
    (root / "sketch_test.txt").unlink()
    with pytest.raises(DataError, match="sketch_test.txt' is missing"):
        load_domainnet(str(root))
    (root / "sketch_test.txt").write_text("sketch/x.png\n")
    with pytest.raises(DataError, match="sketch_test.txt' line 1"):
        load_domainnet(str(root))


def test_cub_files(tmp_path):
    root = cub_tree(tmp_path / "cub", classes=4)
    data = load_cub(str(root))
    assert len(data.x_train) == 8 and len(data.x_test) == 4  # train_test_split.txt: 2 train, 1 test per class
    assert data.class_names[0] == "001.Bird_0" and sorted(set(data.y_test.tolist())) == [0, 1, 2, 3]
    assert all("Bird_" in p and p.endswith("_2.png") for p in data.x_test)
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt' is missing"):
        load_cub(str(root))


def test_broken_image_and_class_count_stop_before_any_run_folder(tmp_path, capsys):
    root = tmp_path / "inr"
    for c in "ab":
        for i in range(2):
            _png(root / "train" / c / f"{i}.png", i)
        _png(root / "test" / c / "0.png", 5)
    (root / "train" / "b" / "1.png").write_bytes(b"not an image")
    cfg = dict(TINY, dataset="imagenetr", data_path=str(root), init_cls=1, increment=1,
               log_dir=str(tmp_path / "logs"))
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    assert main([f"--config={p}"]) == 2
    err = capsys.readouterr().err
    assert "1 image file(s) cannot be read" in err and "train/b/1.png" in err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    _png(root / "train" / "b" / "1.png", 9)
    assert main([f"--config={p}", "--expected_classes", "200"]) == 2
    assert "has 2 classes, but config key 'expected_classes' says 200" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot read image"):  # a file broken after the check: named too
        from utils.data.data_manager import load_image
        load_image(str(root / "train" / "b" / "missing.png"))


def split_tree(root: Path, classes: int) -> Path:
    """An ImageNet-R / -A split as prepare_split leaves it: train/ and test/ class folders."""
    for c in range(classes):
        for part, n in (("train", 2), ("test", 1)):
            for i in range(n):
                _png(root / part / f"n{c:08d}" / f"{i}.png", c)
    return root


TREES = {"imagenetr": lambda p: split_tree(p, 200), "imageneta": lambda p: split_tree(p, 200),
         "domainnet": lambda p: domainnet_tree(p, 345), "cub": lambda p: cub_tree(p, 200, per_class=2)}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One generated tree per dataset, with the benchmark's full class count (200 or 345)."""
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in TREES.items()}


CONFIGS = sorted(p.name for p in (ROOT / "exps").glob("*_*.json")
                 if p.stem.split("_")[-1] in ("inr", "inr5", "inr20", "ina", "dom", "cub"))


def test_every_benchmark_config_is_there():
    assert CONFIGS == sorted(
        [f"{m}_{t}.json" for m in ("sdlora", "gumbel") for t in ("inr", "inr5", "inr20", "ina", "dom", "cub")]
        + [f"{m}_{t}.json" for m in ("simplecil", "ranpac") for t in ("inr", "ina", "dom", "cub")])


@pytest.mark.parametrize("name", CONFIGS)
def test_benchmark_config_runs_one_task(name, trees, tmp_path):
    """The shipped config as it is, pointed at a generated tree, with a tiny random-init ViT: one task."""
    raw = json.loads((ROOT / "exps" / name).read_text())
    cfg = load_config(str(ROOT / "exps" / name), {"data_path": str(trees[raw["dataset"]])})
    data = load_dataset(cfg)
    assert data.n_classes == raw["expected_classes"]
    tiny = {k: TINY[k] for k in ("device", "num_workers", "progress", "backbone_type", "pretrained",
                                 "backbone_kwargs", "img_size", "batch_size")}
    if raw["model_name"] == "ranpac":  # SimpleCIL and RanPAC train no adapter and refuse the LoRA keys
        tiny["ranpac_dim"] = 64
    elif raw["model_name"] != "simplecil":
        tiny.update(lora_rank=TINY["lora_rank"], epochs=2)
    extra = [f"--{k}={json.dumps(v)}" for k, v in tiny.items()]
    assert main([f"--config={ROOT / 'exps' / name}", f"--data_path={trees[raw['dataset']]}", "--max_tasks=1",
                 "--train_per_class=1", "--test_per_class=1", f"--log_dir={tmp_path}", *extra]) == 0
    metrics = json.loads(next(tmp_path.iterdir()).joinpath("metrics.json").read_text())
    assert len(metrics["A"]) == 1
