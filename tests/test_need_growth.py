"""Growth on need (need_threshold): two trials judged on held-out images; and the second shift kind, rot180."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from main import main
from tests.conftest import learner_for, resumed_and_uninterrupted
from models.need_growth import NeedGrowth
from utils.config import ConfigError, build_config
from utils.data.data_manager import DataManager, shift_appearance, split_per_class
from utils.data.datasets import SplitData

NEED = dict(model_name="sdlora", skip_mode="reuse", epochs=3, trial_epochs=1)


@pytest.mark.parametrize("over, match", [
    (dict(model_name="sdlora", need_threshold=0.0), 'needs "skip_mode": "reuse"'),
    (dict(NEED, need_threshold=0.0, drift_threshold=0.1), "different growth rules"),
    (dict(NEED, need_threshold=0.0, trial_epochs=3), "must be below 'epochs'"),
    (dict(model_name="sdlora", need_holdout=0.3), "only applies with 'need_threshold'"),
    (dict(NEED, need_signal="fit"), "'need_signal' only applies with 'need_threshold'"),
    (dict(NEED, need_threshold=0.8, need_signal="loss"), "need_signal"),
    (dict(NEED, need_threshold=0.0, need_holdout=1.0), "'need_holdout' = 1.0 must be in"),
    (dict(model_name="gumbel_sdlora", need_threshold=0.0), "not used by model_name 'gumbel_sdlora'"),
])
def test_need_keys_that_cannot_work_are_rejected(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, **over))


def test_the_held_out_share_is_per_class_seeded_and_never_in_the_trials(tiny, tmp_path):
    labels = np.repeat(np.arange(3), [10, 5, 1])
    learn, judge = split_per_class(labels, 0.2, seed=4)
    assert sorted(learn + judge) == list(range(16)) and not set(learn) & set(judge)
    assert [int((labels[judge] == c).sum()) for c in range(3)] == [2, 1, 1]  # round(0.2 n), at least one
    assert split_per_class(labels, 0.2, seed=4) == (learn, judge)
    learner, dm = learner_for(tiny, tmp_path, need_threshold=0.0, **NEED)
    loader = learner.train_loader(dm, 1)
    trial, held = NeedGrowth(learner).split(1, loader)
    assert not set(trial.dataset.indices) & set(held.dataset.indices)
    assert len(held.dataset) == 2 * round(0.2 * 16)
    assert held.dataset.augment_seed is None and held.dataset.transform is learner.test_tf


@pytest.mark.parametrize("threshold, grows", [(1e9, False), (-1e9, True)])
def test_need_rule_reuses_or_grows_and_counts_both_trials(threshold, grows, tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, need_threshold=threshold, **NEED)
    learner.run(dm)
    m = learner.metrics
    full, trial = 2, 2  # 32 images / batch 16; the trials see 32 - 2 x 3 held-out = 26 images: 2 steps
    assert m["active_adapters"] == ([1, 2, 3] if grows else [1, 1, 1])
    assert [g["grow"] for g in m["growth"]] == [grows, grows]
    assert m["train_steps"] == [3 * full] + [2 * trial + 2 * full] * 2  # two 1-epoch trials, then 2 epochs
    assert learner.net.backbone.served_by == ({} if grows else {1: 0, 2: 0})
    rec = torch.load(tmp_path / "growth_task_2.pt", weights_only=True)
    assert rec["gain"] == pytest.approx(rec["loss_reuse"] - rec["loss_new"])
    assert rec["reopened"] == (1 if grows else 0) and rec["trained_adapter"] == (2 if grows else 0)


def test_need_decision_tracks_the_threshold_and_the_trials_do_not_depend_on_it(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path / "a", max_tasks=2, need_threshold=1e9, **NEED)
    learner.run(dm)
    g = learner.metrics["growth"][0]["gain"]
    for th, grow in ((g + 1e-6, False), (g - 1e-6, True)):
        other, dm2 = learner_for(tiny, tmp_path / str(th), max_tasks=2, need_threshold=th, **NEED)
        other.run(dm2)
        assert other.metrics["growth"][0]["grow"] is grow
        assert other.metrics["growth"][0]["gain"] == g


def test_reuse_goes_on_from_the_reuse_trial_not_from_the_task_start(tiny, tmp_path, monkeypatch):
    """When reuse wins, the adapter, alphas and head the reuse trial ended with train on (the new trial's
    changes are gone): the network before the last fit equals the one right after the reuse trial."""
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, need_threshold=1e9, **NEED)
    x = torch.randn(4, 3, 32, 32)
    seen, fit = [], learner.fit

    def spy(task, *a, **k):
        if task == 1:
            learner.net.train()  # the unmerged forward pass, as training sees it
            with torch.no_grad():
                seen.append(learner.net(x))
        fit(task, *a, **k)
        if task == 1 and len(seen) == 1:
            with torch.no_grad():
                learner.net.train()
                seen.append(learner.net(x))  # right after the reuse trial
    monkeypatch.setattr(learner, "fit", spy)
    learner.run(dm)
    assert len(seen) == 4  # start of the reuse trial, its end, start of the new trial, start of the rest
    # the new trial starts from the task's start (the reuse trial's start holds adapter 0 reopened: the same
    # function, other rounding), and reuse goes on from where its trial ended
    assert torch.allclose(seen[2], seen[0], atol=1e-6) and not torch.allclose(seen[1], seen[0], atol=1e-3)
    assert torch.allclose(seen[3], seen[1], atol=1e-6)


@pytest.mark.parametrize("threshold, grows", [(1e9, False), (-1e9, True)])
def test_fit_signal_runs_one_trial_and_a_growing_task_trains_every_epoch(threshold, grows, tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, need_threshold=threshold, need_signal="fit", **NEED)
    learner.run(dm)
    m = learner.metrics
    full, trial = 2, 2  # as above: the reuse trial on 26 images, the rest on all 32
    assert m["active_adapters"] == ([1, 2, 3] if grows else [1, 1, 1])
    assert [g["grow"] for g in m["growth"]] == [grows, grows] and all("gain" not in g for g in m["growth"])
    assert m["train_steps"] == [3 * full] + [trial + (3 if grows else 2) * full] * 2
    rec = torch.load(tmp_path / "growth_task_2.pt", weights_only=True)
    assert rec["fit"] == pytest.approx(rec["loss_reuse"] / np.log(2)) and "loss_new" not in rec  # 2 classes a task
    assert rec["trained_adapter"] == (2 if grows else 0)


def test_fit_decision_tracks_the_threshold_and_a_grown_task_starts_from_the_task_start(tiny, tmp_path, monkeypatch):
    learner, dm = learner_for(tiny, tmp_path / "a", max_tasks=2, need_threshold=1e9, need_signal="fit", **NEED)
    learner.run(dm)
    f = learner.metrics["growth"][0]["fit"]
    x = torch.randn(4, 3, 32, 32)
    for th, grow in ((f + 1e-6, False), (f - 1e-6, True)):
        other, dm2 = learner_for(tiny, tmp_path / str(th), max_tasks=2, need_threshold=th, need_signal="fit", **NEED)
        seen, fit = [], other.fit

        def spy(task, *a, **k):
            if task == 1:
                other.net.train()
                with torch.no_grad():
                    seen.append(other.net(x))
            fit(task, *a, **k)
        monkeypatch.setattr(other, "fit", spy)
        other.run(dm2)
        assert other.metrics["growth"][0]["grow"] is grow and other.metrics["growth"][0]["fit"] == f
        assert len(seen) == 2  # the reuse trial, then the rest of the task
        # growing: the trial is undone, the new adapter starts where the task started; reusing: from the trial's end
        assert torch.allclose(seen[1], seen[0], atol=1e-6) is grow


@pytest.mark.parametrize("signal", ["gain", "fit"])
def test_need_run_resumes_to_the_uninterrupted_numbers(signal, tiny, tmp_path):
    cfg = dict(tiny, need_threshold=0.0 if signal == "gain" else 0.9, need_signal=signal, **NEED)
    got, want = resumed_and_uninterrupted(cfg, tmp_path)
    for key in ("accuracy_matrix", "A", "active_adapters", "growth", "train_steps"):
        assert got[key] == want[key], key


# ---- shift_kind rot180 --------------------------------------------------------------------------------
def test_rot180_keeps_every_pixel_value_and_only_moves_them():
    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = shift_appearance(img, "rot180")
    assert out.shape == img.shape and out[:, 0, 0].tolist() == img[:, -1, -1].tolist()
    assert torch.equal(out.flatten(1).sort(1).values, img.flatten(1).sort(1).values)  # same values per channel
    assert torch.equal(shift_appearance(out, "rot180"), img)
    grey = shift_appearance(img, "grey_invert")
    assert not torch.equal(grey.flatten(1).sort(1).values, img.flatten(1).sort(1).values)


def test_patch_shuffle_moves_whole_tiles_by_the_fixed_order_and_keeps_every_value():
    from utils.data.data_manager import TILE_ORDER
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = shift_appearance(img, "patch_shuffle")
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.equal(out.flatten(1).sort(1).values, img.flatten(1).sort(1).values)  # same values per channel
    for pos, src in enumerate(TILE_ORDER):  # the tile at grid position pos is the source tile src (8 x 8 pixels)
        (r, c), (sr, sc) = divmod(pos, 4), divmod(src, 4)
        assert torch.equal(out[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8], img[:, 8 * sr:8 * sr + 8, 8 * sc:8 * sc + 8])
    assert sorted(TILE_ORDER) == list(range(16)) and all(src != pos for pos, src in enumerate(TILE_ORDER))
    odd = shift_appearance(img[:, :30, :31], "patch_shuffle")  # 7 x 7 tiles, the last 2 rows and 3 columns stay
    assert torch.equal(odd[:, 28:], img[:, 28:30, :31]) and torch.equal(odd[:, :, 28:], img[:, :30, 28:31])
    assert torch.equal(odd[:, :7, :7], img[:, 14:21, 7:14])


def test_shift_kind_reaches_the_listed_tasks_and_subsets(tiny):
    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(4), 3)
    data = SplitData(rng.randint(0, 256, (12, 4, 6, 3)).astype(np.uint8), y, rng.randint(
        0, 256, (12, 4, 6, 3)).astype(np.uint8), y.copy(), list("abcd"))
    plain = DataManager(data, 2, 2, False, 3)
    rot = DataManager(data, 2, 2, False, 3, shift_tasks=[1], shift_kind="rot180")
    ident = lambda im: im  # noqa: E731
    for t in (0, 1):
        a, b = plain.train_set(t, ident), rot.train_set(t, ident).subset(range(6))
        for i in range(6):
            assert torch.equal(b[i][0], torch.flip(a[i][0], (1, 2)) if t == 1 else a[i][0])
    with pytest.raises(ConfigError, match="shift_kind"):
        build_config(dict(tiny, shift_kind="rot90"))


def test_report_plots_the_need_signal_with_the_shifted_tasks(tiny, tmp_path):
    from utils.report import growth_signal, load_run
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(dict(tiny, need_threshold=0.0, shift_tasks=[2], shift_kind="rot180", **NEED)))
    assert main([f"--config={p}"]) == 0
    (rd,) = Path(tiny["log_dir"]).iterdir()
    assert main(["--report", str(rd)]) == 0
    assert (rd / "plots" / "growth_signal.png").is_file()
    name, signal, grew = growth_signal(load_run(rd))
    m = json.loads((rd / "metrics.json").read_text())
    assert "held-out gain" in name and signal == {g["task"]: g["gain"] for g in m["growth"]}
    assert grew == {t: g > 0.0 for t, g in signal.items()} and sorted(signal) == [1, 2]
