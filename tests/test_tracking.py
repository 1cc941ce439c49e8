"""loggers: the scalars a run logged read back from CSV, TensorBoard event files and the offline wandb run;
a resumed run appends to the same files."""
import csv
import json
from pathlib import Path

import pytest

from main import main
from utils.config import ConfigError, build_config


def run(cfg: dict, tmp_path: Path, name: str, *extra) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    assert main([f"--config={p}", *extra]) == 0
    (d,) = Path(cfg["log_dir"]).iterdir()
    return d


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_and_tensorboard_scalars_read_back(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d = run(dict(tiny, epochs=2, loggers=["csv", "tensorboard"]), tmp_path, "a")
    m = json.loads((d / "metrics.json").read_text())
    ep = rows(d / "epochs.csv")
    loss = [r for r in ep if r["key"] == "train/loss"]
    assert [(int(r["task"]), int(r["step"])) for r in loss] == [(t, 1000 * t + e) for t in range(3) for e in (1, 2)]
    tasks = [r for r in rows(d / "tasks.csv") if r["key"] == "task/A"]
    assert [float(r["value"]) for r in tasks] == pytest.approx(m["A"])
    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    tb_a = acc.Scalars("task/A")
    assert [e.step for e in tb_a] == [0, 1, 2] and [e.value for e in tb_a] == pytest.approx(m["A"], abs=1e-4)
    tb_loss = acc.Scalars("train/loss")
    assert [e.value for e in tb_loss] == pytest.approx([float(r["value"]) for r in loss], rel=1e-5)
    assert len(acc.Scalars("task/active_adapters")) == 3


def test_gumbel_logs_tau_and_the_new_adapters_beta(tiny, tmp_path):
    d = run(dict(tiny, model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.2, phase1_fraction=0.2,
                 epochs=5, gate_lr=5.0, growth_cost=0.05, loggers=["csv"], max_tasks=2), tmp_path, "g")
    ep = rows(d / "epochs.csv")
    assert any(r["key"] == "gate/tau" for r in ep)
    beta = [r for r in ep if r["key"] == "gate/beta_new"]
    assert beta and all(r["task"] == "1" and "phase 1" in r["desc"] for r in beta)
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in beta)


def test_a_resumed_run_appends_to_the_same_files(tiny, tmp_path):
    d = run(dict(tiny, loggers=["csv"], max_tasks=2), tmp_path, "r")
    assert main(["--resume", str(d), "--max_tasks", "3"]) == 0
    tasks = [int(r["task"]) for r in rows(d / "tasks.csv") if r["key"] == "task/A"]
    assert tasks == [0, 1, 2]
    assert rows(d / "epochs.csv")[0].keys() == {"task", "step", "desc", "key", "value"}


def test_wandb_offline_run(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = run(dict(tiny, loggers=["wandb"], max_tasks=1), tmp_path, "w")
    runs = list((d / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unknown_or_missing_loggers_are_refused(tiny, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="distinct"):
        build_config(dict(tiny, loggers=["mlflow"]))
    import builtins
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(tiny, loggers=["tensorboard"])))
    assert main([f"--config={p}"]) == 2
    assert 'pip install -e ".[tracking]"' in capsys.readouterr().err
    assert not Path(tiny["log_dir"]).exists() or not list(Path(tiny["log_dir"]).iterdir())
