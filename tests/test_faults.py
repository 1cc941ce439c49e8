"""Runs that survive being killed: SIGKILL or SIGTERM in the middle of a task, then --resume, gives the
metrics (and Gumbel mask and beta records) of an uninterrupted run, with no half-written file."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from main import EXIT_TERMINATED, main
from tests.conftest import ROOT, TINY

GROW = dict(model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.2, phase1_fraction=0.2,
            gumbel_tau_schedule="phase", gate_lr=5.0, growth_cost=0.05)


def config(tmp_path: Path, name: str, **extra) -> tuple[Path, Path]:
    log_dir = tmp_path / name
    cfg = dict(TINY, log_dir=str(log_dir), train_per_class=48, epochs=12, max_tasks=2, **extra)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p, log_dir


def tasks_done(log_dir: Path) -> int:
    for m in log_dir.glob("*/metrics.json"):
        try:
            return len(json.loads(m.read_text())["A"])
        except (json.JSONDecodeError, KeyError):
            return 0
    return 0


def kill_in_task_1(cfg: Path, log_dir: Path, sig: int) -> tuple[Path, subprocess.CompletedProcess]:
    """Start the run and send ``sig`` when its log shows task 1's first epoch (11 more to go): keyed to the
    log, not to a clock, so a fast machine cannot finish task 1 before the signal lands."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), f"--config={cfg}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # the logger flushes every record
        seen.append(line)
        if re.search(r"Task 1\b[^>]*Epoch 1/", line):
            break
    else:
        raise AssertionError("the run ended before task 1 began:\n" + "".join(seen[-20:]))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    (run_dir,) = log_dir.iterdir()
    return run_dir, subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)


@pytest.mark.parametrize("sig, extra", [(signal.SIGKILL, {}), (signal.SIGKILL, GROW), (signal.SIGTERM, {})],
                         ids=["sigkill-sdlora", "sigkill-gumbel-growth", "sigterm-sdlora"])
def test_killed_mid_task_then_resumed_equals_uninterrupted(sig, extra, tmp_path):
    cfg, log_dir = config(tmp_path, "killed", **extra)
    run_dir, res = kill_in_task_1(cfg, log_dir, sig)
    if sig == signal.SIGTERM:
        assert res.returncode == EXIT_TERMINATED
        assert f"--resume {run_dir}" in res.stderr and "completed tasks are saved" in res.stderr
    else:
        assert res.returncode == -signal.SIGKILL
    assert tasks_done(log_dir) == 1  # killed inside task 1, task 0 saved
    for f in run_dir.glob("*.safetensors"):
        load_file(str(f))  # every checkpoint on disk is whole

    assert main(["--resume", str(run_dir)]) == 0
    assert not list(run_dir.glob(".*.tmp"))
    ref_cfg, ref_dir = config(tmp_path, "uninterrupted", **extra)
    assert main([f"--config={ref_cfg}"]) == 0
    (ref_run,) = ref_dir.iterdir()
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, ref_run))
    for key in ("accuracy_matrix", "A", "active_adapters", "adapter_params", "forgetting"):
        assert got[key] == want[key], key
    if extra:
        assert torch.equal(torch.load(run_dir / "pruning_mask.pt"), torch.load(ref_run / "pruning_mask.pt"))
        for t in range(len(want["A"])):
            a, b = (torch.load(d / f"beta_values_task_{t}.pt", weights_only=True) for d in (run_dir, ref_run))
            assert torch.equal(a["beta_values"], b["beta_values"]) and torch.equal(a["anchor"], b["anchor"])


# ---- bad input: a clear error (exit 2) before any training, nothing lost --------------------------------
def cli(cfg: dict, tmp_path: Path, capsys, *extra) -> tuple[int, str]:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    code = main([f"--config={p}", *extra])
    return code, capsys.readouterr().err


def npz(tmp_path: Path, **over) -> str:
    import numpy as np
    x = np.zeros((6, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    arrays = dict(x_train=x, y_train=y, x_test=x, y_test=y)
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("over, needle", [
    (dict(y_test=None), "needs x_train, y_train, x_test, y_test"),
    (dict(y_train=[0, 1, 2]), "y_train must be 6 integer labels"),
    (dict(x_test=__import__("numpy").zeros((6, 8, 8), "uint8")), "x_test must be uint8 (N, H, W, 3)"),
    (dict(y_train=[0, 1, 2, 0, 1, -1]), "labels must lie in"),
    (dict(y_train=[0, 1, 5, 0, 1, 5]), "every class present"),
])
def test_bad_npz_is_refused_before_any_run_folder(over, needle, tiny, tmp_path, capsys):
    cfg = dict(tiny, dataset="cifar100", data_path=npz(tmp_path, **{k: (__import__("numpy").array(v)
                                                                      if isinstance(v, list) else v)
                                                                  for k, v in over.items()}), img_size=32)
    code, err = cli(cfg, tmp_path, capsys)
    assert code == 2 and needle in err
    assert not Path(tiny["log_dir"]).exists() or not any(Path(tiny["log_dir"]).iterdir())


def test_unwritable_log_dir_and_too_many_classes(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = cli(dict(tiny, log_dir=str(blocker / "logs")), tmp_path, capsys)
    assert code == 2 and "config key 'log_dir'" in err and "not writable" in err
    code, err = cli(dict(tiny, init_cls=20), tmp_path, capsys)
    assert code == 2 and "config key 'init_cls' = 20 asks for more classes than the dataset's 6" in err
    assert not Path(tiny["log_dir"]).exists()  # checked before the run folder (or log_dir) is made


def test_weights_of_another_architecture(tiny, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=8, depth=2, embed_dim=64, num_heads=4)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    code, err = cli(dict(tiny, pretrained=True, pretrained_path=str(tmp_path / "w.safetensors")), tmp_path, capsys)
    assert code == 2 and "could not load weights for 'vit_tiny_patch16_224'" in err and "w.safetensors" in err


def test_resume_of_a_folder_whose_config_no_longer_fits(tiny, tmp_path, capsys):
    code, _ = cli(dict(tiny, max_tasks=1), tmp_path, capsys)
    (run_dir,) = Path(tiny["log_dir"]).iterdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(cfg, lora_rank=3, max_tasks=None)))
    metrics = (run_dir / "metrics.json").read_text()
    assert main(["--resume", str(run_dir)]) == 2
    assert "do not fit its config.json" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == metrics  # nothing lost


# ---- two processes in one folder; a write that fails ---------------------------------------------------
def config_with(tmp_path: Path, name: str, **keys) -> tuple[Path, Path]:
    cfg, log_dir = config(tmp_path, name)
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), **keys)))
    return cfg, log_dir


def test_a_second_resume_of_a_folder_still_training_is_refused(tmp_path, capsys):
    from main import EXIT_BUSY
    cfg, log_dir = config_with(tmp_path, "busy", epochs=40)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), f"--config={cfg}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while tasks_done(log_dir) < 1:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # frozen inside task 1, lock held: no race with a fast machine
        (run_dir,) = log_dir.iterdir()
        assert main(["--resume", str(run_dir)]) == EXIT_BUSY
        err = capsys.readouterr().err
        assert f"pid {proc.pid}" in err and "in use by" in err
        assert "Resuming" not in (run_dir / "train.log").read_text()  # the refused process logged nothing
    finally:
        proc.kill()
        proc.communicate()
    # once the holder is gone (SIGKILL releases the lock) the folder resumes
    assert main(["--resume", str(run_dir), "--max_tasks", "1"]) == 0


def test_a_write_that_fails_keeps_every_saved_file_and_stops_with_its_own_code(tmp_path, capsys, monkeypatch):
    import errno
    import os
    from main import EXIT_WRITE_FAILED
    import utils.io as io
    cfg, log_dir = config_with(tmp_path, "full", epochs=2)
    real = os.replace

    def replace(src, dst):  # the disk fills up when task 1's checkpoint is written
        if str(dst).endswith("task_1.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    assert main([f"--config={cfg}"]) == EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert "task_1.safetensors" in err and "No space left on device" in err and "--resume" in err
    (run_dir,) = log_dir.iterdir()
    assert not list(run_dir.glob(".*.tmp"))
    load_file(str(run_dir / "task_0.safetensors"))                      # saved before: whole
    m = json.loads((run_dir / "metrics.json").read_text())  # task 1 is not marked done without its checkpoint
    assert len(m["A"]) == 1 and not (run_dir / "task_1.safetensors").exists()
    monkeypatch.setattr(io.os, "replace", real)
    assert main(["--resume", str(run_dir)]) == 0  # the folder resumes: task 1 is trained again
    assert len(json.loads((run_dir / "metrics.json").read_text())["A"]) == 2 and \
        (run_dir / "task_1.safetensors").exists()
