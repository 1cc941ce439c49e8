"""torchrun: 2 CPU processes (gloo) train what one process trains with the same global batch.

Tolerance: DDP averages the per-process mean gradients, a sum taken in another order than one process's
mean over the whole batch, so float32 results differ by rounding (~1e-7 a step) that the steps carry on.
Tensors are compared to 1e-4; accuracies, argmaxes far from those margins, must be equal to within one
test image (in practice they are equal).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tests.conftest import ROOT, TINY
from utils.data.data_manager import EpochSampler, TaskDataset

GROW = dict(model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.2, phase1_fraction=0.4,
            gumbel_tau_schedule="phase", gate_lr=5.0, growth_cost=0.05)
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_main(procs: int, args: list[str]) -> subprocess.CompletedProcess:
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return subprocess.run(runner + [str(ROOT / "main.py"), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def launch(tmp_path: Path, name: str, procs: int, **keys) -> tuple[Path, subprocess.CompletedProcess]:
    log_dir = tmp_path / name
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(dict(TINY, **{"log_dir": str(log_dir), "max_tasks": 3, "epochs": 2, "batch_size": 16,
                                            "seed_per_sample": True, **keys})))
    return log_dir, run_main(procs, [f"--config={cfg}"])


def one_folder(log_dir: Path) -> Path:
    runs = [p for p in log_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # rank 0 alone made a folder
    return runs[0]


@pytest.mark.parametrize("keys", [{}, GROW], ids=["sdlora", "gumbel"])
def test_two_processes_equal_one(keys, tmp_path):
    one_dir, one = launch(tmp_path, "one", 1, **keys)
    two_dir, two = launch(tmp_path, "two", 2, **keys)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = one_folder(one_dir), one_folder(two_dir)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # no half-written file
    assert not list(b.glob(".*.tmp"))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    n_test = 8 * 2 * 3  # test images after the last task
    for ra, rb in zip(ma["accuracy_matrix"], mb["accuracy_matrix"]):
        assert np.allclose(ra, rb, atol=100 / n_test + 1e-9)
    for t in range(3):
        ta, tb = (load_file(str(d / f"task_{t}.safetensors")) for d in (a, b))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-4)
    if keys:  # the same growth decisions and gate records
        mask_a, mask_b = (torch.load(d / "pruning_mask.pt", weights_only=True) for d in (a, b))
        assert torch.equal(mask_a, mask_b)
        for t in range(3):
            ra, rb = (torch.load(d / f"beta_values_task_{t}.pt", weights_only=False) for d in (a, b))
            torch.testing.assert_close(ra["beta_values"], rb["beta_values"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ra["logits"], rb["logits"], rtol=1e-4, atol=1e-4)


def test_torchrun_resume_continues_where_the_run_stopped(tmp_path):
    """A 2-process run stopped after task 1 (max_tasks 2), resumed by torchrun to task 3, equals one
    uninterrupted process (the same tolerance as above)."""
    one_dir, one = launch(tmp_path, "one", 1)
    part_dir, part = launch(tmp_path, "part", 2, max_tasks=2)
    assert one.returncode == 0 and part.returncode == 0, part.stderr[-2000:]
    run = one_folder(part_dir)
    resumed = run_main(2, ["--resume", str(run), "--max_tasks", "3"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one_folder(one_dir), run))
    assert len(mb["A"]) == 3 and np.allclose(ma["A"], mb["A"], atol=100 / 48 + 1e-9)
    torch.testing.assert_close(load_file(str(one_folder(one_dir) / "task_2.safetensors"))["head.weight"],
                               load_file(str(run / "task_2.safetensors"))["head.weight"], rtol=1e-4, atol=1e-4)


def test_torchrun_refuses_a_config_that_would_differ(tmp_path):
    log_dir, proc = launch(tmp_path, "bad", 2, seed_per_sample=False)
    assert proc.returncode != 0 and '"seed_per_sample": true' in proc.stderr
    assert not log_dir.exists() or not any(log_dir.iterdir())


def test_seeded_images_do_not_depend_on_workers_or_the_process():
    """seed_per_sample: an image's augmentation is a function of (seed, epoch, index) alone."""
    from utils.data.transforms import build_transforms
    tf, _ = build_transforms(32, [0.2, 1.0], None, None)
    rng = np.random.RandomState(0)
    ds = TaskDataset(rng.randint(0, 255, (12, 40, 40, 3), dtype=np.uint8), np.arange(12) % 3, tf, augment_seed=5)

    def images(workers: int, world: int, rank: int, epoch: int) -> dict[int, torch.Tensor]:
        sampler = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        out = [x for x, _ in DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)]
        return dict(zip([k % len(ds) for k in keys], torch.cat(out)))

    single = images(0, 1, 0, epoch=1)
    assert all(torch.equal(single[i], x) for i, x in images(2, 1, 0, epoch=1).items())
    shards = {**images(0, 2, 0, epoch=1), **images(0, 2, 1, epoch=1)}
    assert shards.keys() == single.keys() and all(torch.equal(single[i], shards[i]) for i in single)
    other_epoch = images(0, 1, 0, epoch=2)
    assert any(not torch.equal(single[i], other_epoch[i]) for i in single)  # a new draw each epoch
