"""Growth on novelty (``novelty_threshold``): a task gets an adapter of its own when its images are unlike those
the latest adapter was trained on, seen through the pretrained backbone; otherwise it reuses that adapter.

At the start of every task, its training images (test transform) go through the ViT as loaded, every adapter left
out (a feature space that does not move as adapters train), and the tokens leaving the middle block give a mean and
a variance per token position and channel: ``token_stats_task_{t}.safetensors`` (statistics, no image). Task t >= 1:
the reference is the average of those statistics over the tasks the latest adapter k has served, and

    novelty = mean over positions and channels of (m_t - m_ref)^2 / v_ref,

the task's mean token shift in units of the reference's spread. With ``novelty_reference: "nearest"`` the
novelty is the least of that over every adapter so far (each against the tasks it served): a task like the
tasks of any earlier adapter, e.g. a return to an earlier domain, is not novel. novelty > threshold, or k already serves
``max_share`` tasks: a new adapter; else k is reopened and trains on the task. With ``novelty_reopen:
"nearest"`` k is the adapter the novelty was least against instead of the latest: a return to an earlier domain
trains that domain's adapter, not the one the stream left. There is no trial: a task costs
SD-LoRA's steps and one forward pass over its images. A task of new classes from the same image domain moves the
mean token little; a change of appearance or layout moves it far (docs/growth.md measures both, block by block).
Every decision is written to ``growth_task_{t}.pt`` and metrics.json's ``growth``.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from models.base import log
from models.reuse import skip_adapter
from utils.io import load_tensors, save_tensors, save_torch


def standardised_shift(mean: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor) -> float:
    """mean over every entry of (mean - ref_mean)^2 / ref_var (entries with no spread left out)."""
    keep = ref_var > 0
    return float(((mean - ref_mean)[keep] ** 2 / ref_var[keep]).double().mean())


Stats = tuple[torch.Tensor, torch.Tensor]  # a task's token mean and variance, (N tokens, d)


def novelty_from(mean: torch.Tensor, refs: list[Stats]) -> float:
    """The rule's signal: a task's mean token against the pooled statistics (mean of the means, mean of the
    variances) of the reference tasks ``refs``."""
    ref_mean = torch.stack([m for m, _ in refs]).mean(0)
    ref_var = torch.stack([v for _, v in refs]).mean(0)
    return standardised_shift(mean, ref_mean, ref_var)


def decide(mean: torch.Tensor, served: dict[int, list[Stats]], latest: int, threshold: float,
           max_share: int | None, reference: str, reopen: str = "latest") -> dict:
    """The rule's decision for a task of token mean ``mean``, given the statistics of the tasks each adapter
    ``served`` (adapter -> its tasks' stats) and the ``latest`` adapter. A reuse reopens the latest adapter, or
    with ``reopen`` "nearest" the nearest one (least novelty) among those within the threshold that are not full;
    a task grows when its novelty exceeds the threshold or the adapter(s) it could reopen serve ``max_share``
    tasks already. One function for the run and for its replay (benchmarks/novelty_decisions.py), so the two
    cannot drift apart."""
    against = [latest] if reference == "latest" else sorted(served)
    novelties = {a: novelty_from(mean, served[a]) for a in against}
    nearest = min(against, key=lambda a: (novelties[a], a))
    novelty = novelties[nearest]
    room = [a for a in against if max_share is None or len(served[a]) < max_share]
    if reopen == "nearest":
        fits = [a for a in room if novelties[a] <= threshold]
        reopened = min(fits, key=lambda a: (novelties[a], a)) if fits else nearest
        full = novelty <= threshold and not fits
    else:
        reopened = latest
        full = latest not in room
    return {"novelty": novelty, "nearest": nearest, "reopened": reopened, "served": len(served[reopened]),
            "full": full, "grow": novelty > threshold or full}


class NoveltyGrowth:
    """The rule above for one learner (``models/sdlora.py``); ``train_task`` replaces its single fit."""

    signal = "novelty"  # the record's key that metrics.json's ``growth`` keeps

    def __init__(self, learner):
        self.learner = learner
        self.stats: dict[int, dict[str, torch.Tensor]] = {}  # task -> {"mean", "var"} (N tokens, d); read lazily

    @property
    def block(self) -> int:
        """The block whose output tokens are compared: the middle one (5 of 12)."""
        return len(self.learner.net.backbone.vit.blocks) // 2 - 1

    def path(self, task: int):
        return self.learner.run_dir / f"token_stats_task_{task}.safetensors"

    @torch.no_grad()
    def observe(self, task: int, loader: DataLoader) -> dict[str, torch.Tensor]:
        """Token statistics of the task's training images under the pretrained backbone; saved with the task."""
        lr = self.learner
        ds = loader.dataset.subset(range(len(loader.dataset)))
        ds.transform, ds.augment_seed = lr.test_tf, None
        backbone = lr.net.backbone
        tokens: list[torch.Tensor] = []
        hook = backbone.vit.blocks[self.block].register_forward_hook(lambda m, i, o: tokens.append(o.float()))
        was = lr.net.training
        lr.net.eval()
        try:
            with backbone.pretrained_only():
                for x, _ in lr.loader(ds, train=False, task=0):
                    backbone.vit(x.to(lr.device))
        finally:
            hook.remove()
            lr.net.train(was)
        t = torch.cat(tokens).double()
        stats = {"mean": t.mean(0).float().cpu(), "var": t.var(0).float().cpu()}
        save_tensors(self.path(task), stats, metadata={"task": str(task), "block": str(self.block)})
        self.stats[task] = stats
        return stats

    def stats_of(self, task: int) -> dict[str, torch.Tensor]:
        """A task's statistics: from memory, or from its file (a resumed or forked run)."""
        if task not in self.stats:
            self.stats[task] = load_tensors(self.path(task))
        return self.stats[task]

    def served(self, adapter: int) -> list[int]:
        """The tasks an adapter has trained on: its own and those that reopened it."""
        by = self.learner.net.backbone.served_by
        return sorted([adapter] + [t for t, a in by.items() if a == adapter])

    def decide(self, task: int, latest: int) -> dict:
        """``decide`` over this run's adapters: the latest for "latest", every one so far for "nearest"."""
        c = self.learner.cfg
        adapters = ([latest] if c.novelty_reference == "latest"
                    else [a for a in self.learner.net.backbone.gate.active_tasks() if a < task])
        served = {a: [(s["mean"], s["var"]) for s in map(self.stats_of, self.served(a))] for a in adapters}
        return decide(self.stats_of(task)["mean"], served, latest, c.novelty_threshold, c.max_share,
                      c.novelty_reference, c.novelty_reopen)

    def train_task(self, task: int, loader: DataLoader, latest: int) -> dict:
        """Measure, decide, then train the task's own adapter or the reopened one for every epoch."""
        lr, c = self.learner, self.learner.cfg
        self.observe(task, loader)
        d = self.decide(task, latest)
        record = {"task": task, "threshold": c.novelty_threshold, "reference": c.novelty_reference, **d}
        k, grow = d["reopened"], d["grow"]
        if not grow:
            skip_adapter(lr.net.backbone, task, reuse=True, adapter=k)
        why = (f"adapter {k} serves {d['served']} task(s), the most allowed" if d["full"]
               else f"threshold {c.novelty_threshold}")
        log.info(f"[Novelty growth] Task {task}: novelty {d['novelty']:.4f} against the tasks of adapter "
                 f"{d['nearest']} ({why}): " + ("new adapter" if grow else f"adapter {k} goes on serving"))
        lr.fit(task, loader, lr.param_groups(), lr.epochs(task),
               desc=f"Task {task} ({'new adapter' if grow else f'reusing adapter {k}'})")
        record["trained_adapter"] = lr.net.backbone.owner(task)
        save_torch(lr.run_dir / f"growth_task_{task}.pt", record)
        return record
