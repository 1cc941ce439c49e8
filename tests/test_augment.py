"""Augmentation on the device: the same distribution as torchvision's transforms, the same pixels for a
fixed box, the loader's order, and per-image streams that do not depend on the batch."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils.data.augment import DRAWS, DeviceAugment, crop_boxes, hashed_uniforms, resample, resize_weights
from utils.data.data_manager import TaskDataset, shift_appearance
from utils.data.device_loader import DeviceLoader
from utils.data.transforms import build_transforms

SCALE = (0.05, 1.0)


def torchvision_boxes(n, h, w, scale=SCALE):
    rrc = v2.RandomResizedCrop(8, scale=scale)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    out = []
    for _ in range(n):
        p = rrc.make_params([img])
        out.append([p["top"], p["left"], p["height"], p["width"]])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("h, w", [(32, 32), (20, 60)])
def test_crop_boxes_follow_torchvisions_distribution(h, w):
    torch.manual_seed(0)
    n = 20000
    ours, flip = crop_boxes(torch.rand(n, DRAWS, dtype=torch.float64), h, w, SCALE)
    ours = ours.double()
    ref = torchvision_boxes(n, h, w)
    for boxes in (ours, ref):
        top, left, bh, bw = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
        assert (bh >= 1).all() and (bw >= 1).all()

    def stats(b):
        area = b[:, 2] * b[:, 3] / (h * w)
        logr = torch.log(b[:, 3] / b[:, 2])
        centre_y = (b[:, 0] + b[:, 2] / 2) / h
        return torch.stack([area.mean(), area.std(), logr.mean(), logr.std(), centre_y.mean(), centre_y.std(),
                            area.quantile(0.1), area.quantile(0.9)])

    # 20,000 draws each: the standard error of these means is ~0.002; a wrong range or law is off by >> 0.02
    assert torch.allclose(stats(ours), stats(ref), atol=0.012), (stats(ours), stats(ref))
    assert abs(flip.double().mean().item() - 0.5) < 0.015


def test_a_wrong_scale_range_would_show():
    torch.manual_seed(0)
    u = torch.rand(20000, DRAWS, dtype=torch.float64)
    a = crop_boxes(u, 32, 32, (0.05, 1.0))[0].double()
    b = crop_boxes(u, 32, 32, (0.08, 1.0))[0].double()
    area = lambda x: (x[:, 2] * x[:, 3]).mean() / 1024  # noqa: E731
    assert area(b) - area(a) > 0.012  # the tolerance above separates these two


def random_images(n=6, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("out", [112, 16])  # up- and downscaling (antialiased)
def test_a_fixed_box_gives_torchvisions_pixels_within_one_level(out):
    x = random_images()
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 10, 20], [7, 1, 25, 9], [0, 0, 1, 1], [10, 10, 22, 22],
                          [2, 2, 5, 30]])
    wy = resize_weights(boxes[:, 2], boxes[:, 0], out, 32)
    wx = resize_weights(boxes[:, 3], boxes[:, 1], out, 32)
    got = resample(x, wy, wx)
    want = torch.stack([TF.to_dtype(TF.resized_crop(x[i], *boxes[i].tolist(), [out, out], antialias=True),
                                    torch.float32, scale=True) for i in range(len(x))])
    diff = (got - want).abs() * 255
    assert diff.max() <= 1.0 + 1e-3          # torchvision's uint8 kernel uses fixed-point weights
    assert (diff > 0.5).float().mean() < 0.06


def test_flip_mirrors_the_crop_exactly():
    x = random_images(4)
    aug = DeviceAugment(40, SCALE)
    u = torch.rand(4, DRAWS, dtype=torch.float64)
    u[:, -1] = 0.9                            # no flip
    seeds = None
    aug.uniforms = lambda n, s: u.clone()     # the same boxes for both calls
    plain = aug.train(x, seeds)
    u[:, -1] = 0.1                            # flip
    flipped = aug.train(x, seeds)
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("size", [112, 24])
def test_test_transform_matches_torchvision_within_one_level(size):
    x = random_images(5)
    _, test_tf = build_transforms(size, SCALE)
    want = torch.stack([test_tf(img) for img in x])
    got = DeviceAugment(size, SCALE).test(x)
    assert got.shape == want.shape
    diff = (got - want).abs() * 255
    assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).float().mean() < 0.01


def test_normalisation_as_the_loader_applies_it():
    x = random_images(2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    _, test_tf = build_transforms(24, SCALE, mean, std)
    got = DeviceAugment(24, SCALE, mean, std).test(x)
    want = torch.stack([test_tf(img) for img in x])
    assert (got - want).abs().max() <= 1.0 / 255 / 0.2 + 1e-4


def test_hashed_uniforms_are_per_seed_and_uniform():
    seeds = np.arange(5000, dtype=np.uint64) * np.uint64(104_729)
    u = hashed_uniforms(seeds, DRAWS)
    assert u.shape == (5000, DRAWS) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - math.sqrt(1 / 12)) < 0.005
    assert np.array_equal(hashed_uniforms(seeds[[7, 3]], DRAWS), u[[7, 3]])  # one image's draws: its seed alone


def dataset(n=20, shifted=None, seed=None):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(n) % 4
    return TaskDataset(images, labels, lambda im: im, augment_seed=seed, shifted=shifted)


def test_device_loader_keeps_the_dataloaders_order_and_applies_the_shift():
    shifted = np.zeros(20, bool)
    shifted[[2, 5]] = True
    ds = dataset(shifted=shifted)
    aug = DeviceAugment(32, SCALE)
    loader = DeviceLoader(ds, 6, True, aug, torch.device("cpu"), torch.Generator().manual_seed(3))
    ref = DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3))
    got_y = torch.cat([y for _, y in loader])
    want_y = torch.cat([y for _, y in ref])
    assert len(loader) == len(ref) == 4 and torch.equal(got_y, want_y)
    test = DeviceLoader(ds, 8, False, aug, torch.device("cpu"))
    assert torch.equal(test.images[2], shift_appearance(torch.from_numpy(ds.images[2]).permute(2, 0, 1)))
    assert torch.equal(test.images[3], torch.from_numpy(ds.images[3]).permute(2, 0, 1))


def test_seeded_images_do_not_depend_on_the_batch_they_fall_in():
    from utils.data.data_manager import EpochSampler
    ds = dataset(seed=11)
    aug = DeviceAugment(24, SCALE)
    per_image = {}
    for bs, replicas in ((4, 1), (7, 1), (5, 2)):
        for rank in range(replicas):
            sampler = EpochSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=11)
            sampler.set_epoch(2)
            loader = DeviceLoader(ds, bs, True, aug, torch.device("cpu"), sampler=sampler)
            keys = [k for k in sampler]
            images = torch.cat([x for x, _ in loader])
            for k, img in zip(keys, images):
                if k in per_image:
                    assert torch.equal(per_image[k], img)
                per_image[k] = img
    assert len(per_image) == len(ds)
    first = list(per_image.values())
    assert not torch.equal(first[0], first[1])


def test_image_files_of_different_sizes_on_the_device_path(tmp_path):
    """Files: decoded by the workers, padded into one batch; each image's own size bounds its crop and
    its test resize (within one level of torchvision's per-image transform)."""
    from PIL import Image
    rng = np.random.RandomState(1)
    paths = []
    for k, (h, w) in enumerate([(40, 30), (25, 60), (33, 33), (50, 20)]):
        p = tmp_path / f"{k}.png"
        Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(p)
        paths.append(str(p))
    shifted = np.array([False, True, False, False])
    ds = TaskDataset(paths, np.arange(4), lambda im: im, shifted=shifted)
    _, test_tf = build_transforms(24, SCALE)
    aug = DeviceAugment(24, SCALE)
    test = DeviceLoader(ds, 4, False, aug, torch.device("cpu"))
    (x, y), = list(test)
    want = torch.stack([test_tf(ds[i][0]) for i in range(4)])  # the loader path, shift included
    assert x.shape == (4, 3, 24, 24) and torch.equal(y, torch.arange(4))
    diff = (x - want).abs() * 255
    assert diff.max() <= 1.0 + 1e-3
    train = DeviceLoader(ds, 4, True, aug, torch.device("cpu"), torch.Generator().manual_seed(0))
    (xt, _), = list(train)
    assert xt.shape == (4, 3, 24, 24) and xt.min() >= 0 and xt.max() <= 1
    # the padding is never sampled: a crop of the 25 x 60 image sees its own pixels only
    sizes = torch.tensor([[40, 30], [25, 60], [33, 33], [50, 20]])
    boxes, _ = crop_boxes(torch.rand(4000, DRAWS, dtype=torch.float64), sizes[:, 0].repeat(1000),
                          sizes[:, 1].repeat(1000), SCALE)
    hw = sizes.repeat(1000, 1)
    assert ((boxes[:, 0] + boxes[:, 2]) <= hw[:, 0]).all() and ((boxes[:, 1] + boxes[:, 3]) <= hw[:, 1]).all()


@pytest.mark.parametrize("mode", ["loader", "device"])
def test_a_run_on_image_files_with_either_path(mode, tiny, tmp_path):
    import json as _json
    from PIL import Image
    from main import main
    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(4):
            (tmp_path / "d" / split / f"c{c}").mkdir(parents=True)
            for k in range(n):
                h, w = 20 + 3 * k, 28 - 2 * k
                Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(
                    tmp_path / "d" / split / f"c{c}" / f"{k}.jpg")
    cfg = dict(tiny, dataset="imagenetr", data_path=str(tmp_path / "d"), augment_on=mode, train_per_class=None,
               test_per_class=None, shift_tasks=[1])
    p = tmp_path / "c.json"
    p.write_text(_json.dumps(cfg))
    assert main([f"--config={p}"]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    m = _json.loads((run / "metrics.json").read_text())
    assert len(m["A"]) == 2 and _json.loads((run / "config.json").read_text())["augment_on"] == mode
