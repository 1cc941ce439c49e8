"""Task 0 of a method under what the public InfLoRA code's ViT does differently from timm's, one change at a time.

    python benchmarks/vit_port_check.py --config exps/inflora_c100.json --protocol exps/protocols/offline.json \
        --data_path <npz> --pretrained_path <weights> --lrate 0.002 --scheduler constant --shuffle true

The public code (liangyanshuo/InfLoRA, models/sinet_inflora.py, models/vit_inflora.py) builds its own ViT: the
position embedding is cut to the first 1 + N entries (``pos_embed[:, :x.size(1)]``) where timm resamples the
pretrained grid to the image size, and its blocks carry no LayerScale unless built with ``init_values``. A
port of that code to a ViT-S/14 DINOv2 checkpoint at 112 px inherits both unless it patches them. For each
variant (as timm builds it; position embedding cut; LayerScale gammas at 1; both) this trains task 0 alone,
same seed and data, and prints its accuracy and the nearest-class-mean accuracy of its frozen features.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import get_learner  # noqa: E402
from utils.config import load_config, parse_overrides  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402
from utils.dist import resolve_device  # noqa: E402

VARIANTS = ("timm", "cut_pos_embed", "no_layerscale", "both")


@torch.no_grad()
def apply_variant(vit: torch.nn.Module, variant: str, weights: dict) -> None:
    """Make timm's ViT behave as the public code's would on the same weights."""
    if variant in ("cut_pos_embed", "both"):
        n = vit.pos_embed.shape[1]
        vit.pos_embed.copy_(weights["pos_embed"][:, :n].to(vit.pos_embed))
    if variant in ("no_layerscale", "both"):
        for blk in vit.blocks:
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.fill_(1.0)


@torch.no_grad()
def ncm_accuracy(learner, dm) -> float:
    """Nearest class mean of the backbone's features (test transform): train means, test images of task 0."""
    learner.net.eval()
    def feats(ds):
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([ds[i][1] for i in range(len(ds))])
        return torch.cat([learner.net.backbone(xs[i:i + 64]) for i in range(0, len(xs), 64)]), ys
    f, y = feats(dm.train_set(0, learner.test_tf))
    means = torch.stack([f[y == c].mean(0) for c in range(*dm.task_range(0))])
    ft, yt = feats(dm.test_set(0, learner.test_tf))
    pred = torch.cdist(ft, means).argmin(1) + dm.task_range(0)[0]
    return 100.0 * float((pred == yt).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, dict(parse_overrides(rest), progress=False, max_tasks=1))
    device = resolve_device(cfg.device)
    data = load_dataset(cfg)
    weights = load_file(cfg.pretrained_path) if cfg.pretrained_path else {}
    if {"cut_pos_embed", "both"} & set(args.variants) and "pos_embed" not in weights:
        ap.error("cutting the position embedding needs the checkpoint's own grid: give --pretrained_path")
    print(f"# {cfg.model_name} task 0, {cfg.backbone_type} @{cfg.img_size}, seed {cfg.seeds[0]}")
    print(f"{'variant':16s} {'task 0 top-1':>12s} {'NCM, frozen':>12s}")
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            c = replace(cfg, log_dir=tmp)
            dm = DataManager.for_config(c, data, c.seeds[0])
            learner = get_learner(c.model_name)(c, device, Path(tmp), c.seeds[0])
            apply_variant(learner.net.backbone.vit, variant, weights)
            ncm = ncm_accuracy(learner, dm)
            learner.run(dm)
            print(f"{variant:16s} {learner.metrics['A'][0]:12.2f} {ncm:12.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
