"""The explainer's references: seq_lora (one LoRA for every task) and lora_task_id (task identity given)."""
import json
from pathlib import Path

import torch

from main import main, make_data_manager
from models.lora_baselines import LoRATaskID, SeqLoRA
from utils.config import build_config
from utils.data.datasets import load_dataset
from utils.io import load_tensors


def learner_for(tiny, tmp_path, cls, **over):
    cfg = build_config(dict(tiny, model_name=cls.name, **over))
    return cls(cfg, torch.device("cpu"), Path(tmp_path), seed=7), make_data_manager(cfg, load_dataset(cfg), 7)


def test_seq_lora_trains_one_adapter_on_every_task(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, SeqLoRA, max_tasks=3)
    snaps = []
    real_end = learner.end_task

    def spy(task):
        real_end(task)
        snaps.append(learner.net.backbone.layers[0].lora_B["0"].detach().clone())

    learner.end_task = spy
    metrics = learner.run(dm)
    assert metrics["active_adapters"] == [1, 1, 1] and learner.gate.n_tasks == 1
    assert not torch.equal(snaps[0], snaps[1]) and not torch.equal(snaps[1], snaps[2])  # overwritten
    assert learner.gate.current == 0 and not learner.gate.alpha["0"].requires_grad       # plain LoRA, w = 1
    ck = load_tensors(Path(learner.run_dir) / "task_2.safetensors")
    assert int(ck["adapter.owner"]) == 0 and torch.equal(ck["adapter.0.B"], snaps[2])


def test_lora_task_id_routes_each_image_to_its_own_adapter(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, LoRATaskID, max_tasks=3, epochs=2)
    metrics = learner.run(dm)
    acc = metrics["accuracy_matrix"]
    # each task's adapter and head rows are its own: later tasks change nothing of it
    assert [row[0] for row in acc] == [acc[0][0]] * 3 and acc[2][1] == acc[1][1] and metrics["forgetting"] == 0
    # every test image passes once, through the adapter of the task its label belongs to
    routed = []
    real_forward = learner.net.backbone.forward

    def spy(x):
        routed.append((learner.gate.current, x.shape[0]))
        return real_forward(x)

    learner.net.backbone.forward = spy
    seen_labels = []
    real_loader = learner.loader

    def loader_spy(dataset, train, task):
        seen_labels.append(sorted({int(dataset.dataset.labels[i]) for i in dataset.indices}))
        return real_loader(dataset, train, task)

    learner.loader = loader_spy
    learner.evaluate(dm, 2)
    assert seen_labels == [[0, 1], [2, 3], [4, 5]]                 # one subset per task, its classes only
    currents = [a for a, _ in routed]
    assert currents == sorted(currents) and set(currents) == {0, 1, 2}   # task 0's images, then 1's, then 2's
    labels = dm.test_set(2, learner.test_tf).labels
    for j in (0, 1, 2):   # as many images went through adapter j as task j has test images
        assert sum(n for a, n in routed if a == j) == int(((labels >= 2 * j) & (labels < 2 * j + 2)).sum())
    saved = json.loads((Path(learner.run_dir) / "metrics.json").read_text())
    assert "til_accuracy" in saved and "til_A_last" in saved
    assert not {"A", "A_last", "accuracy_matrix"} & set(saved)   # never reported as class-incremental


def test_lora_task_id_resumes_to_the_same_numbers(tiny, tmp_path):
    cfg = dict(tiny, model_name="lora_task_id", epochs=2)
    main(["--config", _write(cfg, tmp_path / "a.json")])
    full_dir = sorted(Path(cfg["log_dir"]).iterdir())[0]
    main(["--config", _write(dict(cfg, max_tasks=2, log_dir=str(tmp_path / "part")), tmp_path / "b.json")])
    part_dir = next((tmp_path / "part").iterdir())
    assert main(["--resume", str(part_dir), "--max_tasks", "3"]) == 0
    full = json.loads((full_dir / "metrics.json").read_text())
    part = json.loads((part_dir / "metrics.json").read_text())
    assert part["til_accuracy"] == full["til_accuracy"]


def _write(cfg: dict, path: Path) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)
