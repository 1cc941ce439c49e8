"""One training epoch of a real config, end to end (data loading included), and where the time goes.

    python benchmarks/epoch.py --config exps/sdlora_c100.json --task 9 --max_steps 50
    python benchmarks/epoch.py --config exps/demo.json

Takes the same ``--config`` and ``--key value`` overrides as main.py. Builds the method, gives it
``--task`` earlier (frozen, random) adapters, then measures on that task's training data:
  data     the DataLoader alone (decode, augment, collate; workers as configured): images/s
  compute  forward + backward + optimiser step on one batch already on the device: images/s
  epoch    the learner's own training loop over the loader (what a run pays): images/s
If ``epoch`` is close to ``compute``, the data pipeline keeps ahead of the model.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from main import make_data_manager, resolve_device  # noqa: E402
from models import get_learner  # noqa: E402
from utils.config import load_config, parse_overrides  # noqa: E402
from utils.datasets import load_dataset  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Limited:
    """A loader cut to its first n batches (the learner's loop sees an ordinary iterable)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self):
        return min(self.n, len(self.loader))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--task", type=int, default=0, help="time this task (earlier adapters are made up)")
    ap.add_argument("--max_steps", type=int, default=None, help="cut the epoch to this many batches")
    args, rest = ap.parse_known_args(argv)
    overrides = dict(parse_overrides(rest), progress=False, epochs=1)
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg)
    dm = make_data_manager(cfg, data, cfg.seeds[0])
    with tempfile.TemporaryDirectory() as tmp:
        learner = get_learner(cfg.model_name)(cfg, device, Path(tmp), cfg.seeds[0])
        for t in range(args.task):  # earlier tasks: structure only, B made non-zero
            learner.begin_task(t, dm.sizes[t])
            if learner.uses_adapters:
                with torch.no_grad():
                    for layer in learner.net.backbone.layers:
                        layer.lora_B[str(t)].normal_(std=0.02)
            learner.net.backbone.freeze_current() if learner.uses_adapters else None
        t = args.task
        lo, hi = dm.task_range(t)
        learner._n_new = hi - lo
        learner.begin_task(t, hi - lo)
        loader = learner.loader(dm.train_set(t, learner.train_tf), train=True, task=t)
        steps = min(args.max_steps or len(loader), len(loader))
        loader = _Limited(loader, steps)
        bs = cfg.batch_size

        # data pipeline alone (first pass also starts the workers: run it twice, time the second)
        for _ in loader:
            pass
        t0 = time.perf_counter()
        n_img = sum(len(y) for _, y in loader)
        data_s = time.perf_counter() - t0

        # compute alone on one resident batch
        x, y = next(iter(loader))
        x, y = x.to(device), y.to(device)
        params = [p for p in learner.net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def step():
            with learner._autocast():
                loss = learner.task_loss(learner.net(x).float(), y, t, lo)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        compute_s = time.perf_counter() - t0

        # the learner's own loop, end to end
        t0 = time.perf_counter()
        learner.fit(t, loader, learner.param_groups(), 1, desc=f"bench task {t}")
        _sync(device)
        epoch_s = time.perf_counter() - t0

    n_compute = steps * len(y)
    print(f"# {cfg.model_name} {cfg.backbone_type} img {cfg.img_size} batch {bs} task {t} "
          f"({learner.gate.n_tasks if learner.uses_adapters else 0} adapters) device {device} "
          f"workers {cfg.workers} amp {cfg.amp} compile {cfg.compile}; {steps} steps, {n_img} images")
    print(f"data     {n_img / data_s:9.1f} img/s   ({data_s:.2f} s)")
    print(f"compute  {n_compute / compute_s:9.1f} img/s   ({compute_s:.2f} s)")
    print(f"epoch    {n_img / epoch_s:9.1f} img/s   ({epoch_s:.2f} s)  = {100 * compute_s / epoch_s * n_img / n_compute:.0f}% "
          "of the compute-only rate")


if __name__ == "__main__":
    main()
