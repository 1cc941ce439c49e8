"""Whole runs on generated data (and on the real CIFAR-100 file with the real ViT-S when present)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from main import main
from tests.conftest import CIFAR_NPZ, ROOT, VIT_S
from utils.config import build_config


def run(cfg_dict, tmp_path, *extra) -> Path:
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg_dict))
    assert main([f"--config={p}", *extra]) == 0
    runs = sorted(Path(cfg_dict["log_dir"]).iterdir())
    return runs[-1]


def test_sdlora_run_writes_everything(tiny, tmp_path):
    rd = run(tiny, tmp_path)
    m = json.loads((rd / "metrics.json").read_text())
    for key in ("accuracy_matrix", "A", "A_last", "A_avg", "forgetting", "old_accuracy", "new_accuracy",
                "top5", "active_adapters", "adapter_params", "train_seconds", "eval_seconds"):
        assert key in m
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    assert m["active_adapters"] == [1, 2, 3]
    # 2 blocks x 2 slices x (4x48 + 48x4) per adapter
    assert m["adapter_params"] == [1536, 3072, 4608]
    assert m["old_accuracy"][0] is None
    cfg = json.loads((rd / "config.json").read_text())
    assert build_config(cfg).epochs == 1 and cfg["seed"] == 7
    ck = load_file(str(rd / "task_2.safetensors"))
    assert ck["adapter.0.A"].shape == (2, 4, 48) and ck["head.weight"].shape == (6, 48)
    log = (rd / "train.log").read_text()
    assert "CNN top1 curve" in log and "Average Accuracy (CNN)" in log and "Forgetting (CNN)" in log
    assert "this backbone is random-init" in log and "--protocol exps/protocols/quick.json" in log  # the demo says so


def test_same_seed_same_numbers(tiny, tmp_path):
    ra, rb = run(tiny, tmp_path), run(tiny, tmp_path)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (ra, rb))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    ta, tb = (load_file(str(r / "task_2.safetensors")) for r in (ra, rb))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rc = run(dict(tiny, seed=8), tmp_path)
    assert not torch.equal(load_file(str(rc / "task_2.safetensors"))["head.weight"], ta["head.weight"])


GROW = dict(gate_scope="new", warmup_fraction=0.2, phase1_fraction=0.2, gumbel_tau_schedule="phase", gate_lr=5.0,
            growth_cost=0.05, epochs=5)


REUSE = dict(GROW, skip_mode="reuse", retrain="skip", cost_by_share=True, growth_cost=50.0)  # every task skips


@pytest.mark.parametrize("model, extra", [("sdlora", {}), ("gumbel_sdlora", {}), ("gumbel_sdlora", GROW),
                                          ("gumbel_sdlora", REUSE),
                                          ("sdlora_kd", dict(kd_threshold=1.0)), ("seq_lora", {})])
def test_resumed_run_equals_uninterrupted(model, extra, tiny, tmp_path):
    cfg = dict(tiny, model_name=model, **{"epochs": 3, **extra})
    full = json.loads((run(cfg, tmp_path) / "metrics.json").read_text())
    part_dir = run(dict(cfg, max_tasks=2 if extra is REUSE else 1), tmp_path)  # REUSE: after a reopening
    assert main(["--resume", str(part_dir), "--max_tasks", "3"]) == 0
    resumed = json.loads((part_dir / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    full_dir = sorted(Path(cfg["log_dir"]).iterdir())[0]
    a, b = load_file(str(full_dir / "task_2.safetensors")), load_file(str(part_dir / "task_2.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if model == "gumbel_sdlora":  # the growth state (mask, anchors) came back from disk, not recomputed
        assert torch.equal(a["gate.pruning_mask"], b["gate.pruning_mask"]) and \
            torch.equal(a["gate.anchor"], b["gate.anchor"])
    if extra is REUSE:  # who served which task came back from the checkpoints: the same shared-cost price
        rec = [torch.load(d / "beta_values_task_2.pt", weights_only=False) for d in (full_dir, part_dir)]
        assert rec[0]["growth_cost"] == rec[1]["growth_cost"] == 25.0 and int(b["adapter.owner"]) == 0
    if model == "sdlora_kd":
        assert torch.equal(a["gate.fold"], b["gate.fold"]) and a["gate.pruning_mask"].tolist() == [1, 0, 0]
    assert main(["--resume", str(part_dir), "--epochs", "4"]) == 2  # may not change the experiment


def test_resume_after_a_task_that_reopened_an_adapter(tiny, tmp_path):
    cfg = dict(tiny, model_name="sdlora", growth_schedule=[0], skip_mode="reuse", epochs=2)
    full = json.loads((run(cfg, tmp_path) / "metrics.json").read_text())
    part_dir = run(dict(cfg, max_tasks=2), tmp_path)  # task 1 trained adapter 0: restored from task_1's file
    assert main(["--resume", str(part_dir), "--max_tasks", "3"]) == 0
    assert json.loads((part_dir / "metrics.json").read_text())["accuracy_matrix"] == full["accuracy_matrix"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_results(tiny, tmp_path, capsys):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(dict(tiny, optimizer="sgd", lrate=1e30, init_lr=1e-3)))
    assert main([f"--config={p}"]) == 3
    assert "loss became" in capsys.readouterr().err
    rd = next(Path(tiny["log_dir"]).iterdir())
    assert json.loads((rd / "metrics.json").read_text())["A"]  # task 0 (sane lr) was saved


def test_linear_probe_and_rank_schedule(tiny, tmp_path):
    probe = {k: v for k, v in tiny.items() if k != "lora_rank"}  # an adapter key: rejected for the probe
    m = json.loads((run(dict(probe, model_name="linear_probe"), tmp_path) / "metrics.json").read_text())
    assert m["active_adapters"] == [0, 0, 0] and m["adapter_params"] == [0, 0, 0]
    rd = run(dict(tiny, model_name="sdlora_rr", rank_schedule=[[0, 4], [1, 2]]), tmp_path)
    assert load_file(str(rd / "task_2.safetensors"))["adapter.0.A"].shape == (2, 2, 48)


GUMBEL = dict(model_name="gumbel_sdlora", epochs=5, gumbel_anneal_rate=0.3, lambda_sparsity=1.0,
              gumbel_tau_final=0.01, prune_rule="threshold", lrate=0.01)


def test_gumbel_prunes_end_to_end_and_mask_persists(tiny, tmp_path):
    cfg = dict(tiny, **GUMBEL, synthetic_classes=10, increment=2, max_tasks=5)
    rd = run(cfg, tmp_path)
    m = json.loads((rd / "metrics.json").read_text())
    assert m["active_adapters"][-1] < 5  # sublinear growth happened
    mask = torch.load(rd / "pruning_mask.pt", weights_only=True)
    assert mask.shape == (5,) and mask.sum() == m["active_adapters"][-1]
    for t in range(5):
        rec = torch.load(rd / f"beta_values_task_{t}.pt", weights_only=True)
        assert {"beta_values", "pruning_mask", "selection_freq", "tau", "alpha", "logits", "gated"} <= set(rec)
    masks = [torch.load(rd / f"beta_values_task_{t}.pt", weights_only=True)["pruning_mask"] for t in range(5)]
    for a, b in zip(masks, masks[1:]):  # once pruned, pruned for good
        assert (b[: len(a)] <= a).all()
    log = (rd / "train.log").read_text()
    assert "[Conditional Growth] Active:" in log and "✗ Pruned task" in log
    # a fresh process reads the run folder and sees the same mask
    code = (f"import torch; m = torch.load(r'{rd / 'pruning_mask.pt'}', weights_only=True); "
            f"print(int(m.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert int(out.stdout) == m["active_adapters"][-1]


def test_gumbel_frequency_rule_runs(tiny, tmp_path):
    cfg = dict(tiny, **dict(GUMBEL, prune_rule="frequency", prune_samples=10, prune_threshold=0.5,
                            prune_scope="new", gate_granularity="layer"))
    rd = run(cfg, tmp_path)
    rec = torch.load(rd / "beta_values_task_2.pt", weights_only=True)
    assert rec["selection_freq"].shape == (3,) and rec["beta_values"].shape == (2, 3)
    assert rec["pruning_mask"][:2].tolist() == [1.0, 1.0]  # scope "new": old adapters are never pruned


@pytest.mark.skipif(not (CIFAR_NPZ.is_file() and VIT_S.is_file()), reason="../shared data/weights not present")
def test_real_cifar_with_real_vit_small(tmp_path):
    cfg = dict(dataset="cifar100", data_path=str(CIFAR_NPZ), init_cls=3, increment=3, max_tasks=2,
               train_per_class=8, test_per_class=5, backbone_type="vit_small_patch14_dinov2",
               pretrained=True, pretrained_path=str(VIT_S), img_size=28, epochs=1, batch_size=8,
               device="cpu", num_workers=0, progress=False, log_dir=str(tmp_path / "logs"), lora_rank=2)
    rd = run(cfg, tmp_path)
    m = json.loads((rd / "metrics.json").read_text())
    assert len(m["A"]) == 2 and m["active_adapters"] == [1, 2]
    assert json.loads((rd / "config.json").read_text())["pretrained_path"] == str(VIT_S)


def test_resume_reports_a_corrupt_checkpoint(tiny, tmp_path, capsys):
    rd = run(dict(tiny, max_tasks=2), tmp_path)
    (rd / "task_1.safetensors").write_bytes(b"not a checkpoint")
    assert main(["--resume", str(rd), "--max_tasks", "3"]) == 2
    assert "task_1.safetensors' is corrupt" in capsys.readouterr().err
    assert json.loads((rd / "metrics.json").read_text())["A"]  # nothing saved was lost


def test_gumbel_resume_ignores_a_later_decision_left_by_a_crash(tiny, tmp_path):
    cfg = dict(tiny, **GUMBEL)
    full = run(cfg, tmp_path)
    part = run(dict(cfg, max_tasks=2), tmp_path)
    torch.save(torch.tensor([0.0, 0.0]), part / "pruning_mask.pt")  # a decision the crash left behind
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["active_adapters"] == b["active_adapters"]
