"""Class order, task splits, subsampling and dataset loading."""
import numpy as np
import pytest

from tests.conftest import CIFAR_NPZ
from utils.data.data_manager import DataManager, class_order, task_sizes
from utils.data.datasets import DataError, load_cifar100, load_image_folder, make_synthetic


def test_class_order_seed_1993():
    assert class_order(100, True, 1993)[:4].tolist() == [68, 56, 78, 8]
    assert class_order(5, False, 1993).tolist() == [0, 1, 2, 3, 4]
    before = np.random.get_state()[1].copy()
    class_order(100, True, 1)
    assert (np.random.get_state()[1] == before).all()  # global numpy state untouched


def test_task_sizes():
    assert task_sizes(100, 10, 10) == [10] * 10
    assert task_sizes(100, 50, 20) == [50, 20, 20, 10]
    with pytest.raises(DataError, match="init_cls"):
        task_sizes(10, 20, 5)


def test_splits_remap_and_subsample():
    d = make_synthetic(6, 10, 4, 8, seed=0)
    dm = DataManager(d, 2, 2, True, 3, train_per_class=5, test_per_class=3)
    ident = lambda x: x  # noqa: E731
    assert dm.n_tasks == 3
    tr = dm.train_set(1, ident)
    assert len(tr) == 10 and set(tr.labels.tolist()) == {2, 3}
    te = dm.test_set(1, ident)
    assert len(te) == 12 and set(te.labels.tolist()) == {0, 1, 2, 3}
    orig = dm.order[tr.labels[0]]  # remapped label -> original class -> same images
    assert any((tr.images[0] == x).all() for x in d.x_train[d.y_train == orig])
    assert dm.task_of_label(np.array([0, 1, 2, 5])).tolist() == [0, 0, 1, 2]
    assert DataManager(d, 2, 2, True, 3, max_tasks=2).n_tasks == 2


def test_synthetic_is_deterministic():
    a, b = make_synthetic(4, 3, 2, 16, seed=5), make_synthetic(4, 3, 2, 16, seed=5)
    assert (a.x_train == b.x_train).all() and a.x_train.dtype == np.uint8


def test_npz_and_missing_paths(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 2, 2])
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    d = load_cifar100(str(tmp_path / "c.npz"), download=False)
    assert d.n_classes == 3 and d.x_train.shape == (4, 8, 8, 3)
    assert load_cifar100(str(tmp_path), download=False).n_classes == 3  # folder holding one .npz
    with pytest.raises(DataError, match="cifar-100-python"):
        load_cifar100(str(tmp_path / "missing"), download=False)
    with pytest.raises(DataError, match="train/<class_name>"):
        load_image_folder(str(tmp_path / "missing"))


def test_image_folder(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / split / c / "a.png")
    d = load_image_folder(str(tmp_path))
    assert d.class_names == ["cat", "dog"] and d.y_train.tolist() == [0, 1]


@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason="../shared CIFAR-100 file not present")
def test_real_cifar_file():
    d = load_cifar100(str(CIFAR_NPZ), download=False)
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_test.shape == (10000, 32, 32, 3)
    assert d.n_classes == 100 and d.class_names[0] == "apple"
