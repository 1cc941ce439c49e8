"""SimpleCIL: class prototypes of the frozen backbone, a cosine classifier, no training (the learner that trains
nothing under the ncm head of models/heads.py)."""
import json

import torch
from safetensors.torch import load_file

from main import main
from tests.conftest import run_config
from models.simplecil import class_means


run = run_config  # tests/conftest.py


def assert_prototypes(learner, dm, head, **tol) -> None:
    """Brute force: every task's training images (test transform) in one batch; the head rows are their class means."""
    for t in range(dm.n_tasks):
        ds = dm.train_set(t, learner.test_tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            f = learner.net.backbone(x)
        lo, hi = dm.task_range(t)
        want = torch.stack([f[y == k].double().mean(0) for k in range(lo, hi)]).float()
        torch.testing.assert_close(head[lo:hi], want, **tol)


def test_class_means_equal_the_batch_means():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(50, 7, generator=g), torch.randint(4, 8, (50,), generator=g)
    got = class_means(f, y, range(4, 8))
    want = torch.stack([f[y == c].double().mean(0) for c in range(4, 8)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_prototypes_are_the_class_means_of_the_frozen_features_and_the_classifier_is_cosine(tiny, tmp_path):
    from main import make_data_manager
    from models import get_learner
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    # the loader path: the brute force below applies the same torchvision transform per image
    cfg = build_config(dict({k: v for k, v in tiny.items() if k != "lora_rank"}, model_name="simplecil",
                            augment_on="loader"))
    rd = run(cfg.to_dict(), tmp_path)
    m = json.loads((rd / "metrics.json").read_text())
    assert m["train_steps"] == [0, 0, 0] and m["active_adapters"] == [0, 0, 0] and m["adapter_params"] == [0, 0, 0]
    # brute force: the backbone's features of every training image of a task (test transform), in one batch
    dm = make_data_manager(cfg, load_dataset(cfg), cfg.seeds[0])
    learner = get_learner("simplecil")(cfg, torch.device("cpu"), tmp_path / "scratch", cfg.seeds[0])
    head = load_file(str(rd / "head_task_2.safetensors"))["means"].float()
    learner.net.eval()
    assert_prototypes(learner, dm, head, rtol=1e-5, atol=1e-6)
    # the logits are cosines: scaling a feature vector changes nothing
    learner.classifier.means = head.double()
    z = torch.randn(3, head.shape[1])
    torch.testing.assert_close(learner.classifier.logits(z), learner.classifier.logits(5 * z))
    assert learner.classifier.logits(z).abs().max() <= 1 + 1e-6


def test_resumed_simplecil_equals_uninterrupted(tiny, tmp_path):
    cfg = dict({k: v for k, v in tiny.items() if k != "lora_rank"}, model_name="simplecil")
    full = run(cfg, tmp_path)
    part = run(dict(cfg, max_tasks=1), tmp_path)
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    x, y = load_file(str(full / "head_task_2.safetensors")), load_file(str(part / "head_task_2.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_first_session_adaptation_trains_one_adapter_merges_it_and_resumes_exactly(tiny, tmp_path, capsys):
    from main import make_data_manager
    from models import get_learner
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    cfg = dict(tiny, model_name="simplecil", first_session_adapt=True, augment_on="loader", epochs=2)
    full = run(cfg, tmp_path)
    m = json.loads((full / "metrics.json").read_text())
    assert m["train_steps"][0] > 0 and m["train_steps"][1:] == [0, 0]
    ck0 = load_file(str(full / "task_0.safetensors"))
    assert "adapter.0.A" in ck0 and ck0["adapter.0.B"].abs().sum() > 0  # the adapter trained and is saved
    # the restored network is the merged one: its features' class means are the saved prototypes
    c = build_config(cfg)
    dm = make_data_manager(c, load_dataset(c), c.seeds[0])
    learner = get_learner("simplecil")(c, torch.device("cpu"), full, c.seeds[0])
    learner.restore(dm, 2)
    assert learner.gate.frozen_active() == [] and learner.gate.current is None  # no adapter in the forward pass
    learner.net.eval()
    head = load_file(str(full / "head_task_2.safetensors"))["means"].float()
    assert_prototypes(learner, dm, head, rtol=1e-4, atol=1e-5)
    part = run(dict(cfg, max_tasks=1), tmp_path)
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    assert json.loads((part / "metrics.json").read_text())["accuracy_matrix"] == m["accuracy_matrix"]
    # without the adaptation the adapter's keys mean nothing: refused
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(dict(tiny, model_name="simplecil")))  # tiny sets lora_rank 4
    assert main([f"--config={p}"]) == 2
    assert "'lora_rank' only applies with \"first_session_adapt\": true" in capsys.readouterr().err
