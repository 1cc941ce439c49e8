"""The statistics heads (models/heads.py): each against a brute-force reference, drift compensation, and a run
with each head: the adapters train as under the linear head, the saved state equals a replay of the
checkpoints, resume and fork equal the uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.heads import (AlignedHead, FeatureRidgeHead, NCMHead, RidgeHead, choose_ridge, class_covariances,
                          gaussian_samples, linear_drift_map, random_projection, sdc_shift, solve, stable_ridge)
from tests.conftest import learner_for, resumed_and_uninterrupted, run_config


class _Cfg:
    ranpac_dim, align_samples, align_epochs, align_lr, align_temperature = 32, 64, 2, 0.01, 0.1


def _tasks(seed=0, d=8, tasks=3, per=2, n=20):
    """Features and labels of ``tasks`` tasks of ``per`` classes, ``n`` images a class, classes apart."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        y = torch.arange(t * per, (t + 1) * per).repeat_interleave(n)
        f = torch.randn(len(y), d, generator=g) + 3 * torch.randn(per * tasks, d, generator=g)[y]
        out.append((f, y, range(t * per, (t + 1) * per)))
    return out


def test_ncm_means_and_cosine_logits():
    h = NCMHead(8, 0, torch.device("cpu"))
    data = _tasks()
    for t, (f, y, cls) in enumerate(data):
        h.observe(t, f, y, cls)
    f = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    brute = torch.stack([f[y == c].double().mean(0) for c in range(6)])
    assert torch.allclose(h.means, brute, atol=1e-12)
    x = torch.randn(5, 8)
    cos = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(x[i], brute[c].float(), dim=0)
                                    for c in range(6)]) for i in range(5)])
    assert torch.allclose(h.logits(x), cos, atol=1e-6)


def test_ridge_is_the_closed_form_over_every_image():
    h = RidgeHead(8, 3, torch.device("cpu"), _Cfg)
    data = _tasks()
    for t, (f, y, cls) in enumerate(data):
        h.observe(t, f, y, cls)
    f = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    H = torch.relu(f @ random_projection(8, 32, 3)).double()
    Y = torch.nn.functional.one_hot(y, 6).double()
    lam = h.ridges[-1]
    W = torch.linalg.solve(H.t() @ H + lam * torch.eye(32, dtype=torch.float64), H.t() @ Y)
    assert torch.allclose(h.W_o.double(), W.t(), rtol=1e-4, atol=1e-6)
    # the ridge is the validation search's choice on the last task's own images
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3 + 7919 * 2))
    f2, y2, _ = data[2]
    assert lam == choose_ridge(torch.relu(f2[order] @ random_projection(8, 32, 3)), y2[order] - 4, 2)[0]


def test_ranpac_ridge_fixes_every_tasks_ridge():
    """ranpac_ridge: the ridge at every task, no search; the fit is the closed form at that ridge."""
    class Fixed(_Cfg):
        ranpac_ridge = 0.37
    h, searched = RidgeHead(8, 3, torch.device("cpu"), Fixed), RidgeHead(8, 3, torch.device("cpu"), _Cfg)
    data = _tasks()
    for t, (f, y, cls) in enumerate(data):
        h.observe(t, f, y, cls)
        searched.observe(t, f, y, cls)
    assert h.ridges == [0.37] * 3 and searched.ridges != h.ridges  # the search chose otherwise
    H = torch.relu(torch.cat([d[0] for d in data]) @ random_projection(8, 32, 3)).double()
    Y = torch.nn.functional.one_hot(torch.cat([d[1] for d in data]), 6).double()
    W = torch.linalg.solve(H.t() @ H + 0.37 * torch.eye(32, dtype=torch.float64), H.t() @ Y)
    assert torch.allclose(h.W_o.double(), W.t(), rtol=1e-4, atol=1e-6)


def test_solve_of_a_singular_G_at_a_tiny_ridge_is_the_minimum_norm_fit():
    """G of fewer images than rows with large eigenvalues (as relu(f W_rand) gives): at ridge 1e-8 a plain solve is
    rounding noise; ``solve`` raises the ridge to ``stable_ridge`` and equals the dual fit H^T (H H^T + l I)^-1 Y."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 200, generator=g, dtype=torch.float64)
    H, x = (torch.relu(torch.randn(n, 16, generator=g, dtype=torch.float64) @ W) * 300 for n in (30, 50))
    Y = torch.nn.functional.one_hot(torch.arange(30) % 3, 3).double()
    G, Q = H.t() @ H, H.t() @ Y
    assert stable_ridge(G, 1e-8) == pytest.approx(1e-12 * float(G.trace())) and stable_ridge(G, 1e6) == 1e6
    dual = H.t() @ torch.linalg.solve(H @ H.t() + 1e-8 * torch.eye(30, dtype=torch.float64), Y)
    assert torch.allclose(x @ solve(G, Q, 1e-8).t(), x @ dual, rtol=1e-4, atol=1e-4 * float((x @ dual).abs().max()))


def test_solve_is_cholesky_and_lu_where_rounding_breaks_positive_definiteness():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    G, Q = X.t() @ X, torch.randn(12, 3, generator=g, dtype=torch.float64)
    A = G + 0.5 * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(solve(G, Q, 0.5), torch.linalg.solve(A, Q).t(), atol=1e-10)
    assert torch.equal(G, X.t() @ X)  # G itself is left as it was
    bad = torch.diag(torch.tensor([1.0, -5.0, 3.0], dtype=torch.float64))  # not positive definite: LU's answer
    ones = torch.ones(3, 2, dtype=torch.float64)
    assert torch.allclose(solve(bad, ones, 1.0), torch.linalg.solve(bad + torch.eye(3, dtype=torch.float64), ones).t())


def test_feature_ridge_from_statistics_is_the_ridge_over_every_image():
    """G = S + sum n_c mu_c mu_c^T is H^T H exactly; compensation shifts the means and keeps S."""
    h = FeatureRidgeHead(8, 3, torch.device("cpu"))
    data = _tasks()
    for t, (f, y, cls) in enumerate(data):
        h.observe(t, f, y, cls)
    f = torch.cat([d[0] for d in data]).double()
    y = torch.cat([d[1] for d in data])
    Y = torch.nn.functional.one_hot(y, 6).double()
    W = torch.linalg.solve(f.t() @ f + h.ridges[-1] * torch.eye(8, dtype=torch.float64), f.t() @ Y)
    assert torch.allclose(h.W_o.double(), W.t(), rtol=1e-4, atol=1e-6)
    scatter = h.scatter.clone()
    old = f[:10].float()
    h.compensate("sdc", old, old + 1.0, 1.0)  # every image moved by 1: so does every mean
    assert torch.equal(h.scatter, scatter)
    shifted = torch.stack([f[y == c].mean(0) + 1.0 for c in range(6)])
    assert torch.allclose(h.means, shifted, atol=1e-10)
    G = scatter + (shifted * h.counts[:, None]).t() @ shifted
    W = torch.linalg.solve(G + h.ridges[-1] * torch.eye(8, dtype=torch.float64), (shifted * h.counts[:, None]).t())
    assert torch.allclose(h.W_o.double(), W.t(), rtol=1e-4, atol=1e-6)


def test_covariances_and_gaussian_samples():
    f, y, cls = _tasks(d=5, n=50)[1]
    cov = class_covariances(f, y, cls)
    for i, c in enumerate(cls):
        assert torch.allclose(cov[i], torch.cov(f[y == c].double().t()), atol=1e-10)
    means = torch.tensor([[1.0, -2, 0, 3, 0.5], [0, 0, 5, 0, 0]], dtype=torch.float64)
    x, lab = gaussian_samples(means, cov, 40000, torch.Generator().manual_seed(0))
    assert lab.tolist() == [0] * 40000 + [1] * 40000
    for c in range(2):
        s = x[lab == c].double()
        assert torch.allclose(s.mean(0), means[c], atol=0.05)
        assert torch.allclose(torch.cov(s.t()), cov[c], atol=0.05 * float(cov[c].abs().max()))


def test_sdc_shift_is_the_weighted_mean_drift():
    g = torch.Generator().manual_seed(1)
    old, means = torch.randn(30, 4, generator=g), torch.randn(3, 4, generator=g, dtype=torch.float64)
    new = old + torch.randn(30, 4, generator=g)
    got = sdc_shift(old, new, means, sigma=0.7)
    d2 = torch.tensor([[float(((old[i].double() - means[c]) ** 2).sum()) for i in range(30)] for c in range(3)])
    s2 = 0.49 * d2.mean()
    for c in range(3):
        w = torch.exp(-d2[c] / (2 * s2))
        want = (w[:, None] * (new - old).double()).sum(0) / w.sum()
        assert torch.allclose(got[c], want, atol=1e-10)


def test_linear_drift_map_recovers_an_affine_drift():
    g = torch.Generator().manual_seed(2)
    old = torch.randn(200, 6, generator=g, dtype=torch.float64)
    P, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    P_, b_ = linear_drift_map(old, old @ P + b, ridge=1e-12)
    assert torch.allclose(P_, P, atol=1e-6) and torch.allclose(b_, b, atol=1e-6)
    h = AlignedHead(6, 0, torch.device("cpu"), _Cfg)
    h.means, h.covs = torch.randn(2, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64).repeat(2, 1, 1)
    means = h.means.clone()
    h.compensate("linear", old, old @ P + b, 1.0)
    P_, b_ = linear_drift_map(old, old @ P + b)  # the default ridge: what compensate uses
    assert torch.allclose(h.covs[0], P_.t() @ P_, atol=1e-10) and torch.allclose(h.means, means @ P_ + b_)


def test_aligned_head_moves_towards_the_gaussians():
    """Alignment from a random head on separable Gaussians classifies their means."""
    class Cfg(_Cfg):
        align_epochs = 20
    torch.manual_seed(0)
    h = AlignedHead(8, 0, torch.device("cpu"), Cfg)
    for t, (f, y, cls) in enumerate(_tasks()):
        fresh = torch.nn.Linear(8, 2)
        h.set_start(torch.cat([h.weight, fresh.weight]), torch.cat([h.bias, fresh.bias]))
        h.observe(t, f, y, cls)
    assert (h.logits(h.means.float()).argmax(1) == torch.arange(6)).all()


# ---- runs -------------------------------------------------------------------------------------------------------
HEADS = [dict(head="ncm"), dict(head="ncm", drift_compensation="sdc"), dict(head="ridge", ranpac_dim=48),
         dict(head="feature_ridge", drift_compensation="sdc"),
         dict(head="aligned", drift_compensation="linear", align_epochs=2, align_samples=32),
         dict(head="feature_ridge", drift_compensation="sdc", first_session_head="ridge", ranpac_dim=48)]


def _ids(over):
    return "-".join(str(v) for v in over.values())


@pytest.mark.parametrize("over", HEADS, ids=_ids)
def test_head_changes_no_training_and_its_state_is_a_replay(tiny, tmp_path, over):
    """The adapters and linear head trained under a statistics head are the linear run's, bit for bit; the
    saved head state equals one rebuilt from the checkpoints (what a fork at an earlier task does)."""
    import main as entry
    from models import get_learner
    from models.heads import rebuild, stored_numbers
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    plain = run_config(dict(tiny, log_dir=str(tmp_path / "plain")), tmp_path)
    run = run_config(dict(tiny, log_dir=str(tmp_path / "head"), **over), tmp_path)
    for t in range(3):
        a, b = load_file(str(plain / f"task_{t}.safetensors")), load_file(str(run / f"task_{t}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = build_config(json.loads((run / "config.json").read_text()))
    dm = entry.make_data_manager(cfg, load_dataset(cfg), cfg.seeds[0])
    fresh = get_learner(cfg.model_name)(cfg, torch.device("cpu"), run, cfg.seeds[0])
    rebuild(fresh, dm, 2)
    saved = load_file(str(run / "head_task_2.safetensors"))
    state = fresh.classifier.state_tensors()
    if fresh.first_session is not None:
        state.update(fresh.first_session.state_tensors())
    assert state.keys() == saved.keys()
    for k, v in state.items():
        assert torch.equal(v, saved[k]), k
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["head_seconds"]) == 3 and m["head_stored_numbers"][-1] == stored_numbers(fresh)
    assert not (run / "head_task_0.safetensors").exists()  # the latest two are kept


@pytest.mark.parametrize("over", HEADS, ids=_ids)
def test_resume_with_each_head_equals_uninterrupted(tiny, tmp_path, over):
    cut, full = resumed_and_uninterrupted(dict(tiny, **over), tmp_path)
    for k in ("accuracy_matrix", "A", "head_stored_numbers"):
        assert cut[k] == full[k], k


@pytest.mark.parametrize("over", [HEADS[1], HEADS[3], HEADS[5]], ids=_ids)
def test_fork_with_a_head_equals_uninterrupted(tiny, tmp_path, over):
    """A fork at task 1 (the head state of task 0 is no longer in the parent: rebuilt from the checkpoints)
    equals the uninterrupted run; a fork that changes the head is refused (the kept tasks were evaluated under
    the parent's)."""
    from main import main
    full = run_config(dict(tiny, log_dir=str(tmp_path / "full"), **over), tmp_path)
    want = json.loads((full / "metrics.json").read_text())
    logs = tmp_path / "fork"
    assert main(["--fork_from", str(full), "--fork_task", "1", f"--log_dir={logs}"]) == 0
    (child,) = logs.iterdir()
    assert json.loads((child / "metrics.json").read_text())["accuracy_matrix"] == want["accuracy_matrix"]
    assert main(["--fork_from", str(full), "--fork_task", "1", f"--log_dir={tmp_path / 'no'}", "--head=linear"]) == 2
    assert not (tmp_path / "no").exists()


def test_linear_default_is_the_unset_head(tiny, tmp_path):
    a = run_config(dict(tiny, log_dir=str(tmp_path / "a")), tmp_path)
    b = run_config(dict(tiny, log_dir=str(tmp_path / "b"), head="linear"), tmp_path, "b.json")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"] and "head_seconds" not in ma
    assert not list(Path(a).glob("head_task_*"))


@pytest.mark.parametrize("bad, says", [
    (dict(align_epochs=3), "'align_epochs' only applies"),
    (dict(head="ridge", drift_compensation="sdc"), "'drift_compensation' only applies"),
    (dict(head="ncm", sdc_sigma=0.5), "'sdc_sigma' only applies"),
    (dict(head="bogus"), "head"),
    (dict(model_name="lora_task_id", head="ncm"), "lora_task_id"),
    (dict(head="ncm", first_session_head="ridge"), "'first_session_head' adds its logits to a ridge head's"),
    (dict(model_name="inflora", head="ridge", first_session_head="ridge"), "inflora folds every task"),
    (dict(head="feature_ridge", first_session_head="ncm"), "first_session_head"),
    (dict(head="feature_ridge", ranpac_ridge=1e6), "'ranpac_ridge' only applies"),
    (dict(head="ridge", ranpac_ridge=0), "ranpac_ridge"),
    (dict(head="ridge", ranpac_ridge=float("inf")), "ranpac_ridge"),
])
def test_bad_head_keys_are_refused(tiny, bad, says):
    from utils.config import ConfigError, build_config
    with pytest.raises(ConfigError, match=says):
        build_config(dict(tiny, **bad))


def test_ranpac_ridge_is_taken_by_a_first_session_ridge_head(tiny):
    from utils.config import build_config
    cfg = build_config(dict(tiny, head="feature_ridge", first_session_head="ridge", ranpac_ridge=1e3))
    assert cfg.ranpac_ridge == 1e3


def test_frozen_old_alphas_keep_their_values(tiny, tmp_path):
    """train_old_alphas false: each alpha trains on its own task only (with alpha_reset_each_task false, an
    old class's features then move only by the adapters added after it)."""
    run = run_config(dict(tiny, log_dir=str(tmp_path / "a"), alpha_reset_each_task=False, train_old_alphas=False,
                          lrate=0.05), tmp_path)
    alphas = [load_file(str(run / f"task_{t}.safetensors"))["gate.alpha"] for t in range(3)]
    assert torch.equal(alphas[1][:1], alphas[0]) and torch.equal(alphas[2][:2], alphas[1])
    assert not torch.equal(alphas[0], torch.tensor([0.8]))  # it trained on its own task


def test_the_replay_gives_each_run_its_own_numbers(tiny, tmp_path):
    """benchmarks/heads.py over a linear-head run: its linear row is the run's, its feature_ridge + sdc row the
    numbers a run with that head in force records."""
    from benchmarks.heads import cache_features, replay, _Cfg
    plain = run_config(dict(tiny, log_dir=str(tmp_path / "plain")), tmp_path)
    with_head = run_config(dict(tiny, log_dir=str(tmp_path / "head"), head="feature_ridge",
                                drift_compensation="sdc", sdc_sigma=0.5), tmp_path, "h.json")
    with_first = run_config(dict(tiny, log_dir=str(tmp_path / "first"), head="feature_ridge",
                                 drift_compensation="sdc", sdc_sigma=0.5, first_session_head="ridge", ranpac_dim=48),
                            tmp_path, "f.json")
    F = cache_features(plain, tmp_path / "cache.safetensors")
    want = [json.loads((d / "metrics.json").read_text()) for d in (plain, with_head, with_first)]
    cfg = _Cfg(sdc_sigma=0.5, ranpac_dim=48)
    for got, m in zip((replay(F, "linear", seed=7), replay(F, "feature_ridge", "sdc", seed=7, cfg=cfg),
                       replay(F, "feature_ridge", "sdc", seed=7, cfg=cfg, first="ridge")), want):
        assert sum(got["accuracy_matrix"], []) == pytest.approx(sum(m["accuracy_matrix"], []), abs=1e-9)
        assert got["forgetting"] == pytest.approx(m["forgetting"], abs=1e-9)
    assert got["head_stored_numbers"] == m["head_stored_numbers"][-1]  # the first-session row: its view counted


# ---- the first-session head (first_session_head) -----------------------------------------------------------------
def test_the_view_gives_back_the_backbone_task_0_left(tiny, tmp_path):
    """LoRAViT.snapshot after task 0, then a later adapter and a moved magnitude: inside ``viewing`` the backbone
    computes what it computed after task 0; outside it computes today's."""
    learner, _ = learner_for(tiny, tmp_path)
    bb = learner.net.backbone
    x = torch.randn(3, 3, 32, 32)
    bb.add_task(0, 4, 0.8)
    for layer in bb.layers:
        torch.nn.init.normal_(layer.lora_B["0"], std=0.1)
    bb.freeze_current()
    bb.eval()
    then = bb(x)
    view = bb.snapshot()
    bb.train()
    bb.add_task(1, 4, 0.8)
    for layer in bb.layers:
        torch.nn.init.normal_(layer.lora_B["1"], std=0.1)
    with torch.no_grad():
        bb.gate.alpha["0"].fill_(1.7)
    bb.freeze_current()
    bb.eval()
    now = bb(x)
    assert (now - then).abs().max() > 1e-2  # the adapters moved the features
    with bb.viewing(view):
        assert torch.allclose(bb(x), then, atol=1e-5)
    assert torch.equal(bb(x), now)


def test_first_session_statistics_are_the_task_0_networks(tiny, tmp_path):
    """Every task's first-session means are its images' mean features through the network restored at task 0 (no
    drift), and a test image's logits are the head's plus the first-session head's."""
    import main as entry
    from models import get_learner
    from models.heads import FeatureRidgeHead, classify
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    run = run_config(dict(tiny, log_dir=str(tmp_path / "r"), head="feature_ridge", drift_compensation="sdc",
                          first_session_head="feature_ridge"), tmp_path)
    cfg = build_config(json.loads((run / "config.json").read_text()))
    dm = entry.make_data_manager(cfg, load_dataset(cfg), 7)
    at0 = get_learner("sdlora")(cfg, torch.device("cpu"), run, 7)
    at0.restore_network(dm, 0)
    at0.net.eval()
    brute = FeatureRidgeHead(at0.net.backbone.num_features, 7, torch.device("cpu"))
    for t in range(3):
        ds = dm.train_set(t, at0.test_tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            brute.observe(t, at0.net.backbone(x).float(), torch.as_tensor(ds.labels), range(*dm.task_range(t)))
    saved = load_file(str(run / "head_task_2.safetensors"))
    # float32 through two paths (low-rank view, merged weights): equal to 1e-3; a task's drift moves them by > 1e-2
    assert torch.allclose(saved["first_session.means"], brute.means, atol=1e-3)
    assert (saved["means"][:2] - brute.means[:2]).abs().max() > 1e-2
    last = get_learner("sdlora")(cfg, torch.device("cpu"), run, 7)
    last.restore(dm, 2)
    last.net.eval()
    test = dm.test_set(2, last.test_tf)
    x = torch.stack([test[i][0] for i in range(8)])
    with torch.no_grad():
        want = (last.classifier.logits(last.net.backbone(x).float())
                + last.first_session.head.logits(at0.net.backbone(x).float()))
        assert torch.allclose(classify(last, x), want, atol=1e-3)


def test_heads_table_leaves_out_a_run_that_has_not_finished(tmp_path, capsys):
    """benchmarks/heads_table.py averages finished runs only: a run still at task 5 of 10 is named, not counted."""
    from benchmarks.heads_table import main
    for seed, (done, a_last) in {1: (10, 60.0), 2: (5, 20.0)}.items():
        run = tmp_path / f"run_{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"seed": seed, "dataset": "cifar100", "init_cls": 10,
                                                     "increment": 10}))
        (run / "metrics.json").write_text(json.dumps({
            "A": [50.0] * done, "A_last": a_last, "A_avg": 55.0, "forgetting": 1.0, "tasks_planned": 10,
            "adapter_params": [100] * done, "active_adapters": [3] * done, "train_seconds": [1.0] * done}))
    assert main(["--row", f"r=runs:{tmp_path}/run_*"]) == 0
    out, err = capsys.readouterr()
    assert "| r | 60.00 | 55.00 |" in out and "| 1 |" in out
    assert "run_2" in err and "run_2" not in out
