"""Shared fixtures: a tiny random-init ViT config on generated data, and the ../shared files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402,F401  (every method registers: the config schema reads their keys)
SHARED = ROOT.parent / "shared"
CIFAR_NPZ = SHARED / "data" / "cifar100" / "cifar100.npz"
VIT_S = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"

TINY = dict(
    dataset="synthetic", synthetic_classes=6, train_per_class=16, test_per_class=8, init_cls=2, increment=2,
    device="cpu", num_workers=0, progress=False, backbone_type="vit_tiny_patch16_224", pretrained=False,
    backbone_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}, img_size=32,
    crop_scale=[0.6, 1.0], lora_rank=4, optimizer="adam", lrate=0.003, epochs=1, batch_size=16, seed=7,
)


def run_config(cfg: dict, tmp_path: Path, name: str = "cfg.json", *extra) -> Path:
    """Write cfg as a config file, run main.py on it, return the one run folder it made."""
    import json
    from main import main
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    logs = Path(cfg["log_dir"])
    before = set(logs.iterdir()) if logs.exists() else set()
    assert main([f"--config={p}", *extra]) == 0
    (new,) = set(logs.iterdir()) - before
    return new


@pytest.fixture
def tiny(tmp_path):
    """A dict of config keys for a few-second run, writing into a temporary log_dir."""
    return dict(TINY, log_dir=str(tmp_path / "logs"))


def resumed_and_uninterrupted(cfg: dict, tmp_path: Path, cut: int = 2, tasks: int = 3) -> tuple[dict, dict]:
    """metrics.json of a run stopped after ``cut`` tasks and resumed to ``tasks``, and of the same run
    uninterrupted (each in a log_dir of its own under tmp_path)."""
    import json

    from main import main
    for name, max_tasks in (("full", None), ("cut", cut)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(dict(cfg, log_dir=str(tmp_path / name), max_tasks=max_tasks)))
        assert main([f"--config={p}"]) == 0
    (part,) = (tmp_path / "cut").iterdir()
    assert main(["--resume", str(part), "--max_tasks", str(tasks)]) == 0
    (full,) = (tmp_path / "full").iterdir()
    return tuple(json.loads((d / "metrics.json").read_text()) for d in (part, full))


def learner_for(tiny: dict, tmp_path, **over):
    """An SD-LoRA learner on the tiny config with ``over`` laid over it, and its data manager (seed 7)."""
    import torch

    from main import make_data_manager
    from models.sdlora import SDLoRA
    from utils.config import build_config
    from utils.data.datasets import load_dataset
    cfg = build_config(dict(tiny, **over))
    return SDLoRA(cfg, torch.device("cpu"), Path(tmp_path), seed=7), make_data_manager(cfg, load_dataset(cfg), 7)
