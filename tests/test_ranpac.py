"""RanPAC: a fixed random projection of the frozen features and a ridge classifier over accumulated statistics
(SimpleCIL's learner under the ridge head of models/heads.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from main import main
from tests.conftest import run_config
from models.heads import random_projection
from models.ranpac import RIDGES, accumulate, choose_ridge, solve

M = 24


run = run_config  # tests/conftest.py


@pytest.fixture
def cfg(tiny):
    return dict({k: v for k, v in tiny.items() if k != "lora_rank"}, model_name="ranpac", ranpac_dim=M,
                augment_on="loader")


def test_incremental_statistics_equal_the_batch_ones():
    g = torch.Generator().manual_seed(0)
    h, y = torch.rand(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (40,), generator=g)
    G, Q = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64)
    for part in (slice(0, 13), slice(13, 29), slice(29, 40)):
        accumulate(G, Q, h[part], y[part])
    Y = torch.nn.functional.one_hot(y, 5).double()
    torch.testing.assert_close(G, h.T @ h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q, h.T @ Y, rtol=1e-12, atol=1e-12)


def test_the_ridge_search_in_dual_form_equals_the_primal_fit():
    g = torch.Generator().manual_seed(1)
    h, y = torch.rand(30, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    best, losses = choose_ridge(h, y, 3)
    Y = torch.nn.functional.one_hot(y, 3).double()
    for lam, loss in zip(RIDGES, losses):
        W = torch.linalg.solve(h[:24].T @ h[:24] + lam * torch.eye(12, dtype=torch.float64), h[:24].T @ Y[:24])
        want = float(((h[24:] @ W - Y[24:]) ** 2).mean())
        assert abs(loss - want) <= 1e-6 * max(want, 1e-12) + 1e-12, lam
    assert best == RIDGES[min(range(len(losses)), key=losses.__getitem__)]


def test_the_classifier_is_the_ridge_solution_over_every_image_seen(cfg, tmp_path):
    from main import make_data_manager
    from models import get_learner
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    rd = run(cfg, tmp_path)
    m = json.loads((rd / "metrics.json").read_text())
    assert len(m["ridge"]) == 3 and m["train_steps"] == [0, 0, 0]
    c = build_config(cfg)
    dm = make_data_manager(c, load_dataset(c), c.seeds[0])
    learner = get_learner("ranpac")(c, torch.device("cpu"), tmp_path / "scratch", c.seeds[0])
    W_rand = random_projection(learner.net.backbone.num_features, M, c.seeds[0])
    assert torch.equal(learner.classifier.W_rand, W_rand)
    learner.net.eval()
    hs, ys = [], []
    for t in range(3):  # brute force: every training image of tasks 0..2 at once, in dataset order
        ds = dm.train_set(t, learner.test_tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            hs.append(torch.relu(learner.net.backbone(x) @ W_rand).double())
        ys.append(torch.tensor([ds[i][1] for i in range(len(ds))]))
    h, y = torch.cat(hs), torch.cat(ys)
    Y = torch.nn.functional.one_hot(y, 6).double()
    state = load_file(str(rd / "head_task_2.safetensors"))
    torch.testing.assert_close(state["G"], h.T @ h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["Q"], h.T @ Y, rtol=1e-6, atol=1e-6)
    learner.classifier.load_state(state)
    want = solve(h.T @ h, h.T @ Y, m["ridge"][-1]).float()
    torch.testing.assert_close(learner.classifier.W_o, want, rtol=1e-4, atol=1e-5)


def test_resumed_and_forked_ranpac_equal_uninterrupted(cfg, tmp_path):
    full = run(cfg, tmp_path)
    part = run(dict(cfg, max_tasks=1), tmp_path)
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["ridge"] == b["ridge"]
    x, y = load_file(str(full / "head_task_2.safetensors")), load_file(str(part / "head_task_2.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    logs = tmp_path / "forks"
    assert main(["--fork_from", str(full), "--fork_task", "1", f"--log_dir={logs}"]) == 0  # G, Q of task 0 rebuilt
    (child,) = logs.iterdir()
    assert json.loads((child / "metrics.json").read_text())["accuracy_matrix"] == a["accuracy_matrix"]


def test_a_resume_without_the_statistics_rebuilds_them(cfg, tmp_path, capsys):
    full = run(cfg, tmp_path)
    part = run(dict(cfg, max_tasks=1), tmp_path)
    (part / "head_task_0.safetensors").unlink()
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    assert "head_task_0.safetensors is not in the run folder: the ridge head is rebuilt" in capsys.readouterr().out
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


def test_ranpac_with_first_session_adaptation_resumes_exactly(cfg, tiny, tmp_path):
    cfg = dict(cfg, first_session_adapt=True, lora_rank=tiny["lora_rank"], epochs=2)
    full = run(cfg, tmp_path)
    part = run(dict(cfg, max_tasks=1), tmp_path)
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["train_steps"][0] > 0
