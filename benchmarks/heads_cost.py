"""What each statistics head costs beside the training it reads out: seconds per task as a ratio of the task's
training seconds, and the numbers and bytes it keeps, measured side by side in one process.

    python benchmarks/heads_cost.py [--config exps/sdlora_c100.json] [--protocol exps/protocols/quick.json]
                                    [--classes 100] [--heads ncm feature_ridge aligned ridge]

Task 0 of the config is trained once (its real loader, optimiser and epochs); then each head takes that task as a
run takes it (models/heads.py ``take_task``: the task's images through the backbone, the statistics, the fit),
with drift compensation's second feature pass where the head allows one. Memory: the head's state after task 0,
and what it grows to at ``--classes`` classes (per-class parts scale with the class count; G does not).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import get_learner  # noqa: E402
from models import heads  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402


def _bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="exps/sdlora_c100.json")
    ap.add_argument("--protocol", default="exps/protocols/quick.json")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--heads", nargs="*", default=["ncm", "feature_ridge", "aligned", "ridge", "feature_ridge@ridge"],
                    help="HEAD or HEAD@FIRST (FIRST: a first_session_head beside it)")
    ap.add_argument("--out", type=Path, default=Path("logs/heads_cost"), help="scratch run folder")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, {"protocol": args.protocol, "max_tasks": 1})
    seed = cfg.seeds[0]
    dm = DataManager.for_config(cfg, load_dataset(cfg), seed)
    args.out.mkdir(parents=True, exist_ok=True)
    learner = get_learner(cfg.model_name)(cfg, torch.device("cpu"), args.out, seed)
    learner.n_new = dm.sizes[0]
    learner.begin_task(0, dm.sizes[0])
    t0 = time.perf_counter()
    learner.train_task(0, learner.train_loader(dm, 0))
    learner.end_task(0)
    train_s = time.perf_counter() - t0
    n0 = dm.sizes[0]
    print(f"{cfg.backbone_type}, {cfg.img_size} px, task 0: {len(dm.train_set(0, learner.test_tf))} images, "
          f"{cfg.epochs} epochs: {train_s:.1f} s of training")
    test = learner.loader(dm.test_set(0, learner.test_tf), train=False, task=0)
    print("head | seconds | / training | stored numbers after task 0 | at N classes | MB at N classes | "
          "eval ms per test image")
    for spec in args.heads:
        kind, _, first = spec.partition("@")
        comp = "sdc" if kind in ("ncm", "feature_ridge", "aligned") else "none"
        d = learner.net.backbone.num_features
        learner.classifier = heads.make_head(kind, d, seed, torch.device("cpu"), cfg)
        learner.first_session = heads.FirstSession(first, d, seed, torch.device("cpu"), cfg) if first else None
        t = time.perf_counter()
        before = heads.task_features(learner, dm, 0)[0] if comp != "none" else None  # compensation's extra pass
        heads.take_task(learner, dm, 0, None)
        s = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            n_test = sum(len(heads.classify(learner, x)) for x, _ in test)
        eval_ms = 1000 * (time.perf_counter() - t) / n_test
        state = learner.classifier.state_tensors()
        if learner.first_session is not None:
            state.update(learner.first_session.state_tensors())
        # one row (or, for the ridge's Q, one column) per class: these grow with the classes
        per_class = {k: v for k, v in state.items() if ".view." not in k and v.dim()
                     and (v.shape[0] == n0 or (k.split(".")[-1] == "Q" and v.shape[1] == n0))}
        fixed = {k: v for k, v in state.items() if k not in per_class}
        scale = args.classes / n0
        numbers = sum(v.numel() for v in fixed.values()) + int(sum(v.numel() for v in per_class.values()) * scale)
        mb = (_bytes(fixed) + _bytes(per_class) * scale) / 2**20
        del before
        name = kind + (f" + {comp}" if comp != "none" else "") + (f" + first-session {first}" if first else "")
        print(f"{name} | {s:.2f} | {s / train_s:.3f} | {heads.stored_numbers(learner):,} | {numbers:,} | {mb:,.1f} | "
              f"{eval_ms:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
