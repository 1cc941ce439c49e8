"""Conditional growth beyond the notes: ungated warm-up, gate scope 'new' with anchored old adapters,
the phase temperature schedule, and SD-LoRA-KD's fold."""
from pathlib import Path

import pytest
import torch

from main import make_data_manager
from models.gumbel_sdlora import GumbelSDLoRA
from models.sdlora import SDLoRAKD
from utils.config import ConfigError, build_config
from utils.data.datasets import load_dataset
from utils.gumbel_utils import phase_temperature
from utils.io import load_tensors

NEED = dict(model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.4, phase1_fraction=0.2,
            gumbel_tau_schedule="phase", gate_lr=0.5, epochs=5)


def learner_for(tiny, tmp_path, cls=GumbelSDLoRA, **over):
    cfg = build_config(dict(tiny, **over))
    learner = cls(cfg, torch.device("cpu"), Path(tmp_path), seed=7)
    return learner, make_data_manager(cfg, load_dataset(cfg), 7)


def spy_fits(learner, describe) -> list[dict]:
    """Wrap learner.fit: before each call record describe(task, loader) plus desc, epochs and the trainable
    tensors; after it, which tensors changed. Returns the list the records go to."""
    seen, real_fit = [], learner.fit

    def spy(task, loader, groups, epochs, desc, **kw):
        named = dict(learner.net.named_parameters())
        before = {n: p.detach().clone() for n, p in named.items()}
        seen.append(dict(describe(task, loader), desc=desc, epochs=epochs,
                         trainable={n for n, p in named.items() if p.requires_grad}))
        real_fit(task, loader, groups, epochs, desc, **kw)
        seen[-1]["changed"] = {n for n, p in learner.net.named_parameters()
                               if not torch.equal(p.detach(), before[n])}

    learner.fit = spy
    return seen


def test_phase_schedule_spans_tau_init_to_tau_final_whatever_the_steps():
    for n in (2, 16, 5000):
        taus = [phase_temperature(s, n, 5.0, 0.5) for s in range(n)]
        assert taus[0] == pytest.approx(5.0) and taus[-1] == pytest.approx(0.5)
        assert all(a > b for a, b in zip(taus, taus[1:]))
    assert phase_temperature(7, 16, 5.0, 0.5) == pytest.approx(5.0 * 0.1 ** (7 / 15))


def test_judging_after_training_needs_no_phase_2(tiny):
    cfg = build_config(dict(tiny, **dict(NEED, warmup_fraction=0.8, phase1_fraction=0.2)))
    assert cfg.warmup_fraction == 0.8  # 4 warm-up + 1 selection epoch of 5: accepted


def test_warmup_trains_the_new_adapter_ungated(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, **NEED)

    def gate_state(task, loader):
        gate = learner.gate
        gate.train()
        w, beta = gate.coefficients()
        return dict(ungated=gate.ungated, beta=beta, w_cur=float(w.detach()[0, -1]),
                    alpha_cur=float(gate.alpha[str(task)].detach()))

    seen = spy_fits(learner, gate_state)
    learner.run(dm)
    assert [s["desc"] for s in seen] == ["Task 0", "Task 1 warm-up", "Task 1 phase 1", "Task 1 phase 2"]
    assert [s["epochs"] for s in seen] == [5, 2, 1, 2]
    warm = seen[1]
    assert warm["ungated"] and warm["beta"] is None          # no gate on the new adapter: g_t = 1 exactly
    assert warm["w_cur"] == warm["alpha_cur"]
    adapter1 = {n for n in warm["trainable"] if ".lora_" in n}
    assert adapter1 and all(n.endswith(".1") for n in adapter1)
    assert warm["trainable"] == adapter1 | {"backbone.gate.alpha.0", "backbone.gate.alpha.1",
                                            "head.weight", "head.bias"}
    assert adapter1 <= warm["changed"] and not any("logits" in n for n in warm["changed"])
    phase1 = seen[2]
    assert not phase1["ungated"] and phase1["beta"].shape == (1, 2)  # new adapter vs the skip option
    assert phase1["trainable"] == {"backbone.gate.logits.1", "head.weight", "head.bias"}
    phase2 = seen[3]  # decided: a kept adapter is alone in its gate, g = 1
    assert phase2["ungated"] and phase2["beta"] is None


def test_holdout_selection_judges_on_images_the_warmup_never_saw(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, selection_holdout=0.25, **NEED)

    def images(task, loader):
        ds = loader.dataset
        idx = sorted(ds.indices) if hasattr(ds, "indices") else list(range(len(ds)))
        return dict(idx=idx, batches=len(loader))

    seen = spy_fits(learner, images)
    learner.run(dm)
    warm, phase1, phase2 = seen[1:]
    assert [s["desc"] for s in seen[1:]] == ["Task 1 warm-up", "Task 1 phase 1", "Task 1 phase 2"]
    n_task = len(seen[0]["idx"])                       # task 1 has as many images as task 0 here
    assert not set(warm["idx"]) & set(phase1["idx"])   # disjoint, and together the whole task
    assert sorted(warm["idx"] + phase1["idx"]) == list(range(n_task)) == phase2["idx"]
    labels = dm.train_set(1, learner.train_tf).labels  # every class is held out in its share
    assert set(labels[phase1["idx"]]) == set(labels) and len(phase1["idx"]) == round(0.25 * n_task)
    # only the logit trains in phase 1, for as many steps as one epoch over the whole task
    assert phase1["trainable"] == phase1["changed"] == {"backbone.gate.logits.1"}
    assert phase1["epochs"] * phase1["batches"] >= seen[0]["batches"]
    assert learner.probe["loss_with"] > 0


def test_old_adapters_keep_their_anchored_gate_value(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=3, **NEED)
    anchors = {}
    real_end = learner.end_task

    def spy(task):
        real_end(task)
        anchors[task] = learner.gate.anchor.clone()
        if task == 2:  # training coefficients of the old adapters during task 2: alpha * anchor
            gate = learner.gate
            gate.train()
            gate.current, gate.ungated = 2, False
            w, beta = gate.coefficients()
            gate.current = None
            old = gate.frozen_active()
            for j, t in enumerate([o for o in old if o != 2]):
                assert float(w.detach()[0, j]) == \
                    pytest.approx(float(gate.alpha[str(t)].detach()) * float(anchors[1][t]))

    learner.end_task = spy
    torch.manual_seed(0)
    learner.run(dm)
    assert anchors[0][0] == 1.0                                 # the first adapter is kept at g = 1
    assert set(anchors[2].tolist()) <= {0.0, 1.0}               # a decision is binary: in (g = 1) or out
    assert torch.equal(anchors[2][:2], anchors[1][:2])          # task 2 never moved adapters 0 and 1
    rec = torch.load(learner.run_dir / "beta_values_task_2.pt", weights_only=True)
    assert rec["gate_scope"] == "new" and "loss_with" in rec and "loss_without" in rec
    assert torch.equal(rec["anchor"], anchors[2])


def test_a_pruned_new_adapter_leaves_the_forward_pass(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, growth_cost=100.0, **NEED)
    learner.run(dm)
    assert learner.gate.active_tasks() == [0]                   # priced out: adapter 1 pruned at its task
    assert all(1 not in layer.frozen and layer.current is None for layer in learner.net.backbone.layers)
    x = torch.randn(4, 3, 32, 32)
    learner.net.eval()
    with torch.no_grad():
        before = learner.net(x)
        for layer in learner.net.backbone.layers:  # scramble the pruned adapter: nothing may change
            layer.lora_B["1"].normal_()
            layer.lora_A["1"].normal_()
        learner.net.backbone.unmerge()
        assert torch.equal(learner.net(x), before)


def kd_learner(tiny, tmp_path, **over):
    learner, dm = learner_for(tiny, tmp_path, cls=SDLoRAKD, model_name="sdlora_kd", **over)
    bb = learner.net.backbone
    g = torch.Generator().manual_seed(3)
    for t in range(2):
        learner.begin_task(t, 2)
        with torch.no_grad():
            for layer in bb.layers:
                layer.lora_B[str(t)].copy_(torch.randn(layer.lora_B[str(t)].shape, generator=g))
        learner.end_task(t)
    return learner


def test_kd_fold_with_zero_residual_leaves_the_output_unchanged(tiny, tmp_path):
    learner = kd_learner(tiny, tmp_path, kd_threshold=1e-3)
    bb = learner.net.backbone
    learner.begin_task(2, 2)
    with torch.no_grad():  # adapter 2 = adapter 0 rescaled: the same normalised direction in every block
        for k, layer in enumerate(bb.layers):
            layer.lora_A["2"].copy_(layer.lora_A["0"])
            layer.lora_B["2"].copy_((2.5 + k) * layer.lora_B["0"])
        learner.gate.alpha["2"].fill_(0.9)
    x = torch.randn(3, 3, 32, 32)
    learner.net.eval()
    bb.gate.current = None
    bb.configure()            # adapter 2 frozen and kept: the reference output
    with torch.no_grad():
        want = learner.net.backbone(x)
    assert learner.fold_if_spanned(2, [0, 1])
    assert learner.gate.active_tasks() == [0, 1]
    with torch.no_grad():
        got = learner.net.backbone(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    rec = torch.load(learner.run_dir / "kd_fit_task_2.pt", weights_only=True)
    assert rec["dropped"] and rec["relative_residual"] < 1e-3
    torch.testing.assert_close(rec["coefficients"], torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)
    assert float(learner.gate.fold[0]) == pytest.approx(0.9, rel=1e-4)  # m_2 * c_0 = (0.9 + 0) * 1
    learner.gate.reset_alphas(0.8)                              # the next task's reset keeps the fold
    assert float(learner.gate.fold[0]) == pytest.approx(0.9, rel=1e-4)


def test_kd_keeps_a_new_direction(tiny, tmp_path):
    learner = kd_learner(tiny, tmp_path, kd_threshold=0.5)
    learner.begin_task(2, 2)
    with torch.no_grad():
        for layer in learner.net.backbone.layers:
            layer.lora_B["2"].normal_()
    learner.end_task(2)
    assert learner.gate.active_tasks() == [0, 1, 2]
    rec = torch.load(learner.run_dir / "kd_fit_task_2.pt", weights_only=True)
    assert not rec["dropped"] and rec["relative_residual"] > 0.5


@pytest.mark.parametrize("over, match", [
    (dict(gate_scope="previous", growth_cost=0.1), "growth_cost"),
    (dict(gate_scope="new", gate_granularity="layer"), "gate_granularity"),
    (dict(gumbel_tau_schedule="phase", gumbel_anneal_rate=0.9), "gumbel_anneal_rate"),
    (dict(warmup_fraction=0.6, phase1_fraction=0.6, epochs=5), "phase 2 no epoch"),
    (dict(two_phase=False, warmup_fraction=0.2), "warmup_fraction"),
    (dict(warmup_fraction=0.0, selection_holdout=0.2), "selection_holdout"),
    (dict(warmup_fraction=0.4, selection_holdout=0.7), "selection_holdout"),
    (dict(two_phase=False, selection_holdout=0.2), "selection_holdout"),
    (dict(skip_mode="reuse", warmup_fraction=0.8, phase1_fraction=0.2, epochs=5), "skip_mode"),
    (dict(cost_by_share=True, growth_cost=0.1), "cost_by_share"),
])
def test_growth_keys_that_cannot_work_are_rejected(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, model_name="gumbel_sdlora", **over))
    with pytest.raises(ConfigError, match="kd_threshold"):
        build_config(dict(tiny, model_name="sdlora", kd_threshold=0.9))


def test_kd_that_drops_nothing_is_sdlora_bit_for_bit(tiny, tmp_path):
    import json
    from safetensors.torch import load_file
    from main import main
    dirs = []
    for extra in ({}, dict(model_name="sdlora_kd", kd_threshold=0.0)):
        p = tmp_path / "c.json"
        p.write_text(json.dumps(dict(tiny, epochs=2, **extra)))
        assert main([f"--config={p}"]) == 0
        dirs.append(max(Path(tiny["log_dir"]).iterdir(), key=lambda d: d.stat().st_mtime_ns))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in dirs)
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["active_adapters"] == b["active_adapters"]
    ta, tb = (load_file(str(d / "task_2.safetensors")) for d in dirs)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_reopening_a_frozen_adapter_leaves_the_output_unchanged(tiny, tmp_path):
    learner, _ = learner_for(tiny, tmp_path, cls=SDLoRAKD, model_name="sdlora")
    bb = learner.net.backbone
    for t in range(2):
        learner.begin_task(t, 2)
        with torch.no_grad():
            for layer in bb.layers:
                layer.lora_B[str(t)].normal_(std=0.3)
        bb.freeze_current()
    x = torch.randn(3, 3, 32, 32)
    learner.net.train()  # unmerged path: frozen adapters normalised, the current one not
    before = learner.net(x)
    bb.reopen(0)
    assert learner.gate.current == 0 and bb.layers[0].lora_B["0"].requires_grad
    assert torch.allclose(learner.net(x), before, atol=1e-5)
    bb.freeze_current()
    assert torch.allclose(learner.net(x), before, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "reuse"])
def test_fixed_growth_schedule(mode, tiny, tmp_path):
    from models.sdlora import SDLoRA
    learner, dm = learner_for(tiny, tmp_path, cls=SDLoRA, model_name="sdlora", growth_schedule=[0, 2],
                              skip_mode=mode, max_tasks=3, save_adapters=True)
    init_B1 = {}
    snap = {}
    real_begin = learner.begin_task

    def spy(task, n):
        real_begin(task, n)
        if task == 1:
            layer = learner.net.backbone.layers[0]
            init_B1["B"] = layer.lora_B["1"].detach().clone()
            snap["A0"] = layer.lora_A["0"].detach().clone()

    learner.begin_task = spy
    metrics = learner.run(dm)
    layer = learner.net.backbone.layers[0]
    assert metrics["active_adapters"] == [1, 1, 2]
    assert learner.gate.active_tasks() == [0, 2]
    assert torch.equal(layer.lora_B["1"], init_B1["B"])     # the skipped task's own adapter never trained
    ck = load_tensors(Path(learner.run_dir) / "task_1.safetensors")
    if mode == "reuse":  # adapter 0 trained on task 1 and is what task 1 saved
        assert not torch.equal(layer.lora_A["0"], snap["A0"]) and int(ck["adapter.owner"]) == 0
        assert torch.equal(ck["adapter.0.A"], layer.lora_A["0"].detach())
    else:
        assert torch.equal(layer.lora_A["0"], snap["A0"]) and int(ck["adapter.owner"]) == 1


def test_gumbel_reuse_trains_the_latest_kept_adapter_when_the_new_one_is_pruned(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, skip_mode="reuse", **dict(NEED, growth_cost=50.0))
    learner.run(dm)
    rec = torch.load(Path(learner.run_dir) / "beta_values_task_1.pt", weights_only=False)
    assert rec["pruning_mask"].tolist() == [1, 0] and rec["trained_adapter"] == 0
    ck = load_tensors(Path(learner.run_dir) / "task_1.safetensors")
    assert int(ck["adapter.owner"]) == 0


@pytest.mark.parametrize("over, match", [
    (dict(skip_mode="reuse"), "growth_schedule"),
    (dict(growth_schedule=[1, 2]), "starting with 0"),
    (dict(growth_schedule=[0, 3, 2]), "increasing"),
])
def test_fixed_schedule_keys_that_cannot_work_are_rejected(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, model_name="sdlora", **over))


def test_cost_by_share_halves_the_growth_cost_once_the_adapter_serves_two_tasks(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=3, skip_mode="reuse", cost_by_share=True,
                              **dict(NEED, growth_cost=50.0))
    learner.run(dm)
    recs = [torch.load(Path(learner.run_dir) / f"beta_values_task_{t}.pt", weights_only=False) for t in (1, 2)]
    assert [r["trained_adapter"] for r in recs] == [0, 0] and learner.net.backbone.tasks_served(0) == 3
    assert [r["growth_cost"] for r in recs] == [50.0, 25.0]


@pytest.mark.parametrize("retrain, cost", [("skip", 50.0), ("all", 0.0)])
def test_retrain_restarts_the_task_from_its_start_state(retrain, cost, tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, max_tasks=2, skip_mode="reuse", retrain=retrain,
                              **dict(NEED, growth_cost=cost))
    seen, start = [], {}
    real_fit, real_state = learner.fit, learner.task_start_state

    def state_spy(task):
        start.update(real_state(task))
        return real_state(task)

    def spy(task, loader, groups, epochs, desc, **kw):
        same = "head.weight" in start and torch.equal(learner.net.head.weight, start["head.weight"])
        seen.append((desc, epochs, same))
        real_fit(task, loader, groups, epochs, desc, **kw)

    learner.fit, learner.task_start_state = spy, state_spy
    learner.run(dm)
    assert [s[:2] for s in seen[1:]] == [("Task 1 warm-up", 2), ("Task 1 phase 1", 1), ("Task 1 phase 2", 5)]
    assert seen[1][2] and not seen[2][2] and seen[3][2]  # phase 2 starts from the head the task began with
    kept = learner.gate.active_tasks()
    assert kept == ([0] if retrain == "skip" else [0, 1])
