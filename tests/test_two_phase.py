"""Two-phase training freezes exactly what SPEC section 3 says, checked on each phase of a real run."""
from pathlib import Path

import torch

from main import make_data_manager
from models.gumbel_sdlora import GumbelSDLoRA
from utils.config import build_config
from utils.data.datasets import load_dataset


def record_phases(tiny, tmp_path, **over):
    cfg = build_config(dict(tiny, model_name="gumbel_sdlora", epochs=3, max_tasks=2, **over))
    learner = GumbelSDLoRA(cfg, torch.device("cpu"), Path(tmp_path), seed=7)
    dm = make_data_manager(cfg, load_dataset(cfg), 7)
    records = []
    real_fit = learner.fit

    def spy(task, loader, groups, epochs, desc, **kw):
        named = dict(learner.net.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        in_groups = [{n for n, p in named.items() if any(p is q for q in g["params"])} for g in groups]
        before = {n: p.detach().clone() for n, p in named.items()}
        real_fit(task, loader, groups, epochs, desc, **kw)
        changed = {n for n, p in learner.net.named_parameters() if not torch.equal(p.detach(), before[n])}
        records.append(dict(desc=desc, epochs=epochs, trainable=trainable, groups=in_groups,
                            lrs=[g.get("lr") for g in groups], changed=changed))

    learner.fit = spy
    learner.run(dm)
    return learner, records


def names(layer_ids, task, kind="lora"):
    return {f"backbone.vit.blocks.{i}.attn.qkv.lora_{ab}.{task}" for i in layer_ids for ab in "AB"}


def test_phases_freeze_what_spec_says(tiny, tmp_path):
    learner, rec = record_phases(tiny, tmp_path)
    head = {"head.weight", "head.bias"}
    blocks = range(2)
    assert [r["desc"] for r in rec] == ["Task 0", "Task 1 phase 1", "Task 1 phase 2"]
    assert [r["epochs"] for r in rec] == [3, 2, 1]  # ceil(0.6 * 3) = 2 epochs in phase 1

    task0, p1, p2 = rec
    assert task0["trainable"] == names(blocks, 0) | {"backbone.gate.alpha.0", "backbone.gate.logits.0"} | head

    # phase 1: the gate logits and the head only; alphas and the new adapter frozen, bit-identical
    assert p1["trainable"] == {"backbone.gate.logits.0", "backbone.gate.logits.1"} | head
    assert p1["changed"] <= p1["trainable"] and "head.weight" in p1["changed"]
    assert {"backbone.gate.logits.0", "backbone.gate.logits.1"} & p1["changed"]

    # phase 2: logits frozen; alphas (own lr group), the new adapter if kept, the head
    kept = learner.gate.pruning_mask[1] > 0
    active = [t for t in (0, 1) if learner.gate.pruning_mask[t] > 0]
    want = {f"backbone.gate.alpha.{t}" for t in active} | head | (names(blocks, 1) if kept else set())
    assert p2["trainable"] == want
    assert p2["changed"] <= p2["trainable"]
    assert not any("logits" in n for n in p2["changed"])
    assert not (names(blocks, 0) & p2["changed"])  # the old adapter never moves
    alpha_group = [g for g in p2["groups"] if any("alpha" in n for n in g)]
    assert len(alpha_group) == 1 and all("alpha" in n for n in alpha_group[0])
    assert p2["lrs"][p2["groups"].index(alpha_group[0])] == learner.cfg.alpha_lr
