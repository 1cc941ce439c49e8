"""How concentrated the inputs of every block's qkv are, and how much of them InfLoRA's A lets through.

    python benchmarks/inflora_inputs.py --config exps/inflora_c100.json --data_path ... --images 125

Takes main.py's ``--config`` and ``--key value`` overrides. On the first ``--images`` training images of task
0 (the test transform, so the figures do not depend on crops) it computes, per block, the input covariance C
InfLoRA builds its A from, and prints:
  top/trace   the largest eigenvalue of C as a share of its trace (how much one direction carries)
  top^2/sum^2 the same share of the squared eigenvalues: what DualGPM's threshold is compared against
  dims@lamb   the dimensions DualGPM keeps after task 0 at threshold ``lamb`` (``update_memory``)
  |A x| inf / lora  the RMS over tokens of ||A x|| = sqrt(tr(A C A^T)) with InfLoRA's task-0 A and with the
              project's Kaiming-uniform LoRA init, and their ratio: B's gradient scales with A x, so the ratio
              says how much larger a step on B is than for an SD-LoRA adapter at the same learning rate.
"""
from __future__ import annotations

import sys

import argparse
import math
import tempfile
from pathlib import Path

import torch

from models import get_learner
from models.inflora import projected_basis, update_memory
from utils.config import load_config, parse_overrides
from utils.data.data_manager import DataManager
from utils.data.datasets import load_dataset
from utils.dist import resolve_device


def rms_through(A: torch.Tensor, cov: torch.Tensor) -> float:
    """sqrt(E ||A x||^2) for inputs x with second moment ``cov``."""
    return math.sqrt(float(torch.trace(A @ cov @ A.T)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--images", type=int, default=125, help="task-0 training images the covariance is taken on")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, dict(parse_overrides(rest), progress=False))
    if cfg.model_name != "inflora":
        raise SystemExit(f"--config must be an inflora config (model_name is {cfg.model_name!r})")
    device = resolve_device(cfg.device)
    dm = DataManager.for_config(cfg, load_dataset(cfg), cfg.seeds[0])
    with tempfile.TemporaryDirectory() as tmp:
        learner = get_learner(cfg.model_name)(cfg, device, Path(tmp), cfg.seeds[0])
        learner.begin_task(0, dm.sizes[0])
        train = dm.train_set(0, learner.test_tf)
        subset = torch.utils.data.Subset(train, range(min(args.images, len(train))))
        covs = learner.input_covariance(learner.loader(subset, train=False, task=0))
        print(f"{len(subset)} task-0 images, test transform; lamb {cfg.lamb}, rank {cfg.lora_rank}")
        print(f"{'block':>5} {'top/trace':>9} {'top^2/sum^2':>11} {'dims@lamb':>9} {'|Ax| inf':>9} "
              f"{'|Ax| lora':>9} {'ratio':>6}")
        for i, (layer, cov) in enumerate(zip(learner.net.backbone.layers, covs)):
            ev = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
            dims = update_memory(cov, None, False, cfg.lamb)[0].shape[1]
            a_inf = projected_basis(cov, None, False, cfg.lora_rank)
            a_lora = layer.lora_A["0"][0].detach().double().cpu()  # the init begin_task gave (k's slice)
            r_inf, r_lora = rms_through(a_inf, cov), rms_through(a_lora, cov)
            print(f"{i:>5} {float(ev[0] / ev.sum()):>9.2f} {float(ev[0] ** 2 / (ev ** 2).sum()):>11.2f} "
                  f"{dims:>9} {r_inf:>9.2f} {r_lora:>9.2f} {r_inf / r_lora:>6.1f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
