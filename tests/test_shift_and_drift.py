"""A stream where the time to grow matters (``shift_tasks``) and growth on drift (``drift_threshold``)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from main import make_data_manager
from tests.conftest import resumed_and_uninterrupted
from models.drift_growth import relative_drift
from models.reuse import skip_adapter, undo_reuse
from models.sdlora import SDLoRA
from models.task_state import snapshot
from utils.config import ConfigError, build_config
from utils.data.data_manager import DataManager, shift_appearance
from utils.data.datasets import DataError, SplitData, load_dataset

DRIFT = dict(model_name="sdlora", skip_mode="reuse", epochs=3, trial_epochs=1)


# ---- shift_tasks -----------------------------------------------------------------------------------
def test_shift_appearance_is_inverted_greyscale():
    img = torch.tensor([[[255, 0], [10, 200]], [[0, 255], [20, 200]], [[0, 0], [30, 200]]], dtype=torch.uint8)
    out = shift_appearance(img)
    luma = [[round(0.299 * 255), round(0.587 * 255)],
            [round(0.299 * 10 + 0.587 * 20 + 0.114 * 30), round(200 * (0.299 + 0.587 + 0.114))]]
    want = 255 - torch.tensor(luma, dtype=torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    for c in range(3):
        assert torch.equal(out[c], want)


def split(n_classes=6, per=4, size=5, seed=0):
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(n_classes), per)
    x_tr = rng.randint(0, 256, (len(y), size, size, 3)).astype(np.uint8)
    x_te = rng.randint(0, 256, (len(y), size, size, 3)).astype(np.uint8)
    return SplitData(x_tr, y.copy(), x_te, y.copy(), [str(i) for i in range(n_classes)])


def raw(ds):
    return [ds[i][0] for i in range(len(ds))], [ds[i][1] for i in range(len(ds))]


def test_shift_tasks_changes_exactly_the_listed_tasks_images_train_and_test():
    data = split()
    plain = DataManager(data, 2, 2, True, 3)
    shifted = DataManager(data, 2, 2, True, 3, shift_tasks=[1])
    ident = lambda im: im  # noqa: E731  (the raw uint8 image, no augmentation)
    for t in range(3):
        (a, ya), (b, yb) = raw(plain.train_set(t, ident)), raw(shifted.train_set(t, ident))
        assert ya == yb
        for u, v in zip(a, b):
            assert torch.equal(v, shift_appearance(u) if t == 1 else u)
    # the test set after task 2 mixes every task: only task 1's classes are shifted
    (a, ya), (b, yb) = raw(plain.test_set(2, ident)), raw(shifted.test_set(2, ident))
    assert ya == yb
    tasks = plain.task_of_label(np.array(ya))
    assert set(tasks.tolist()) == {0, 1, 2}
    for u, v, t in zip(a, b, tasks):
        assert torch.equal(v, shift_appearance(u) if t == 1 else u)
        assert not torch.equal(u, v) or t != 1


def test_shift_survives_subsets_and_a_task_outside_the_stream_is_refused():
    dm = DataManager(split(), 2, 2, True, 3, shift_tasks=[0])
    ds = dm.train_set(0, lambda im: im)
    sub = ds.subset([1, 3])
    assert torch.equal(sub[0][0], ds[1][0]) and torch.equal(sub[1][0], ds[3][0])
    with pytest.raises(DataError, match="shift_tasks.*3 tasks"):
        DataManager(split(), 2, 2, True, 3, shift_tasks=[3])
    with pytest.raises(ConfigError, match="distinct task indices"):
        build_config({"shift_tasks": [1, 1]})


# ---- growth on drift -------------------------------------------------------------------------------
def test_relative_drift():
    a = torch.tensor([[3.0, 4.0]])
    assert relative_drift(a, a) == 0.0
    assert relative_drift(a, a * 1.5) == pytest.approx(0.5)
    assert relative_drift(torch.zeros(0, 0), torch.zeros(0, 0)) == 0.0


@pytest.mark.parametrize("over, match", [
    (dict(model_name="sdlora", drift_threshold=0.1), 'needs "skip_mode": "reuse"'),
    (dict(DRIFT, drift_threshold=0.1, growth_schedule=[0, 2]), "no 'growth_schedule'"),
    (dict(DRIFT, drift_threshold=0.1, trial_epochs=3), "must be below 'epochs'"),
    (dict(model_name="sdlora", trial_epochs=2), "only applies with 'drift_threshold'"),
    (dict(model_name="gumbel_sdlora", drift_threshold=0.1), "not used by model_name 'gumbel_sdlora'"),
])
def test_drift_keys_that_cannot_work_are_rejected(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, **over))


def learner_for(tiny, tmp_path, **over):
    cfg = build_config(dict(tiny, **over))
    return SDLoRA(cfg, torch.device("cpu"), Path(tmp_path), seed=7), make_data_manager(cfg, load_dataset(cfg), 7)


def test_an_undone_trial_gives_back_the_task_start_network_bit_for_bit(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=1, drift_threshold=0.1, **DRIFT)
    learner.run(dm)
    dm = make_data_manager(build_config(dict(tiny, max_tasks=2)), load_dataset(learner.cfg), 7)
    learner.n_new = 2
    learner.begin_task(1, 2)
    x = torch.randn(4, 3, 32, 32)
    learner.net.train()
    before = learner.net(x).detach()
    state = snapshot(learner, 0)
    skip_adapter(learner.net.backbone, 1, reuse=True)
    learner.fit(1, learner.loader(dm.train_set(1, learner.train_tf), train=True, task=1),
                learner.param_groups(), 1, "trial")
    assert not torch.equal(learner.net(x).detach(), before)  # the trial moved adapter 0, alphas, head
    undo_reuse(learner, 1, 0, state)
    assert learner.gate.current == 1 and learner.gate.active_tasks() == [0, 1] and \
        1 not in learner.net.backbone.served_by
    assert torch.equal(learner.net(x).detach(), before)
    trainable = {n for n, p in learner.net.named_parameters() if p.requires_grad and ".lora_" in n}
    assert trainable and all(n.endswith(".1") for n in trainable)


@pytest.mark.parametrize("threshold, grows", [(1e9, False), (1e-9, True)])
def test_drift_rule_reuses_or_grows_and_counts_the_trial(threshold, grows, tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, drift_threshold=threshold, **DRIFT)
    learner.run(dm)
    m = learner.metrics
    steps_per_epoch = -(-2 * 16 // 16)  # 2 classes x 16 images, batch 16
    assert m["active_adapters"] == ([1, 2, 3] if grows else [1, 1, 1])
    assert [g["grow"] for g in m["growth"]] == [grows, grows]
    assert all(g["drift"] > 0 for g in m["growth"])
    extra = steps_per_epoch if grows else 0   # an undone trial epoch is paid for
    assert m["train_steps"] == [3 * steps_per_epoch] + [3 * steps_per_epoch + extra] * 2
    assert learner.net.backbone.served_by == ({} if grows else {1: 0, 2: 0})
    rec = torch.load(tmp_path / "growth_task_2.pt", weights_only=True)
    assert rec["reopened"] == (1 if grows else 0) and rec["trained_adapter"] == (2 if grows else 0)


def test_drift_decision_tracks_the_threshold(tiny, tmp_path):
    """The recorded drift decides: a threshold just above it reuses, just below it grows."""
    learner, dm = learner_for(tiny, tmp_path / "a", max_tasks=2, drift_threshold=1e9, **DRIFT)
    learner.run(dm)
    d = learner.metrics["growth"][0]["drift"]
    for th, grow in ((d * 1.01, False), (d * 0.99, True)):
        other, dm2 = learner_for(tiny, tmp_path / str(th), max_tasks=2, drift_threshold=th, **DRIFT)
        other.run(dm2)
        assert other.metrics["growth"][0]["grow"] is grow
        assert other.metrics["growth"][0]["drift"] == d  # the same trial, whatever the threshold


def test_drift_run_resumes_to_the_uninterrupted_numbers(tiny, tmp_path):
    cfg = dict(tiny, drift_threshold=0.05, **DRIFT)
    got, want = resumed_and_uninterrupted(cfg, tmp_path)
    for key in ("accuracy_matrix", "A", "active_adapters", "adapter_params", "growth", "train_steps"):
        assert got[key] == want[key], key
