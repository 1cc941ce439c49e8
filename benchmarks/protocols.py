"""Training seconds of one task under each protocol, side by side in one process.

    python benchmarks/protocols.py --config exps/sdlora_c100.json \
        --protocols exps/protocols/offline.json exps/protocols/quick.json --task 9 --rounds 3

Takes main.py's ``--key value`` overrides (applied to every protocol, e.g. the ../shared paths). For each
protocol it builds the method at task ``--task`` (earlier adapters made up, as benchmarks/epoch.py does) and
times the learner's own epoch over that task's training images; rounds interleave the protocols, so the
machine's drift falls on all of them alike. It prints per protocol the tokens per image, images and steps
per task, the median epoch, the task's training seconds (epoch x epochs) and the ratio to the first protocol.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.epoch import make_learner, timed  # noqa: E402
from utils.config import load_config, parse_overrides  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402
from utils.dist import resolve_device  # noqa: E402


class Setting:
    """One protocol's learner at the timed task, with its training loader."""

    def __init__(self, config: str, protocol: str, overrides: dict, task: int, tmp: str):
        self.protocol = protocol
        self.cfg = load_config(config, dict(overrides, protocol=protocol, progress=False))
        self.device = resolve_device(self.cfg.device)
        dm = DataManager.for_config(self.cfg, load_dataset(self.cfg), self.cfg.seeds[0])
        self.task = task
        self.learner = make_learner(self.cfg, dm, self.device, task, tmp)
        self.loader = self.learner.loader(dm.train_set(task, self.learner.train_tf), train=True, task=task)
        self.images = len(self.loader.dataset)
        vit = self.learner.net.backbone.vit
        self.tokens = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)

    def epoch(self) -> None:
        self.learner.fit(self.task, self.loader, self.learner.param_groups(), 1, desc=f"bench {self.protocol}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--protocols", nargs="+", required=True, help="protocol files; ratios are to the first")
    ap.add_argument("--task", type=int, default=9, help="time this task (earlier adapters are made up)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)
    with tempfile.TemporaryDirectory() as tmp:
        settings = [Setting(args.config, p, overrides, args.task, tmp) for p in args.protocols]
        for s in settings:  # warm-up
            s.epoch()
        secs = {s.protocol: [] for s in settings}
        for _ in range(args.rounds):
            for s in settings:
                secs[s.protocol].append(timed(s.epoch, s.device))
    print(f"# {settings[0].cfg.model_name} task {args.task}, median of {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'protocol':36s} {'img':>4s} {'tokens':>6s} {'images':>6s} {'steps':>5s} {'s/epoch':>8s} "
          f"{'train s/task':>12s} {'x first':>7s}")
    first = None
    for s in settings:
        c = s.cfg
        per_task = statistics.median(secs[s.protocol]) * c.epochs
        first = first or per_task
        steps = -(-s.images // c.batch_size) * c.epochs
        print(f"{s.protocol:36s} {c.img_size:4d} {s.tokens:6d} {s.images:6d} {steps:5d} "
              f"{per_task / c.epochs:8.2f} {per_task:12.2f} {per_task / first:7.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
