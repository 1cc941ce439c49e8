"""Growth on novelty (novelty_threshold, max_share): token statistics of the pretrained backbone, the standardised
shift against the latest adapter's tasks, and a decision taken before any training."""
import numpy as np
import pytest
import torch

from models.novelty_growth import NoveltyGrowth, standardised_shift
from tests.conftest import learner_for, resumed_and_uninterrupted
from utils.config import ConfigError, build_config
from utils.io import load_tensors

NOVELTY = dict(model_name="sdlora", skip_mode="reuse", epochs=2)


@pytest.mark.parametrize("over, match", [
    (dict(model_name="sdlora", novelty_threshold=0.1), 'needs "skip_mode": "reuse"'),
    (dict(NOVELTY, novelty_threshold=0.1, need_threshold=0.0), "are different growth rules"),
    (dict(NOVELTY, novelty_threshold=0.1, growth_schedule=[0, 2]), "no 'growth_schedule'"),
    (dict(NOVELTY, max_share=3), "'max_share' only applies with 'novelty_threshold'"),
    (dict(NOVELTY, novelty_threshold=-1.0), "novelty_threshold"),
    (dict(NOVELTY, novelty_threshold=0.1, max_share=0), "max_share"),
    (dict(model_name="gumbel_sdlora", novelty_threshold=0.1), "not used by model_name 'gumbel_sdlora'"),
])
def test_novelty_keys_that_cannot_work_are_rejected(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, **over))


def test_standardised_shift_against_brute_force():
    g = torch.Generator().manual_seed(0)
    m, ref, var = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.rand(5, 7, generator=g) + 0.1
    want = np.mean([(float(m[i, j]) - float(ref[i, j])) ** 2 / float(var[i, j]) for i in range(5) for j in range(7)])
    assert standardised_shift(m, ref, var) == pytest.approx(want, rel=1e-6)
    var[0, 0] = 0.0  # no spread: left out
    keep = [(i, j) for i in range(5) for j in range(7) if (i, j) != (0, 0)]
    want = np.mean([(float(m[i, j]) - float(ref[i, j])) ** 2 / float(var[i, j]) for i, j in keep])
    assert standardised_shift(m, ref, var) == pytest.approx(want, rel=1e-6)


def test_statistics_are_the_pretrained_middle_blocks_tokens_whatever_the_adapters(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, novelty_threshold=1e9, **NOVELTY)
    vit = learner.net.backbone.vit
    ds = dm.train_set(1, learner.test_tf)
    x = torch.cat([b for b, _ in learner.loader(ds, train=False, task=0)])  # the images as the rule's loader gives them
    out = []
    h = vit.blocks[len(vit.blocks) // 2 - 1].register_forward_hook(lambda m, i, o: out.append(o.double()))
    with torch.no_grad():
        vit.eval()
        vit(x)  # no adapter added yet: the backbone as loaded
    h.remove()
    want_mean, want_var = out[0].mean(0), out[0].var(0)
    learner.run(dm)  # adapters trained on tasks 0-2: the statistics must not see them
    got = load_tensors(tmp_path / "token_stats_task_1.safetensors")
    # equal up to float32 rounding (the loader's batches of 16 against one batch of 32 here)
    assert torch.allclose(got["mean"].double(), want_mean, atol=1e-5)
    assert torch.allclose(got["var"].double(), want_var, atol=1e-5)
    with torch.no_grad():  # and the adapters are back in the forward pass afterwards
        learner.net.eval()
        with learner.net.backbone.pretrained_only():
            plain = learner.net.backbone(x[:4])
        assert not torch.allclose(learner.net.backbone(x[:4]), plain, atol=1e-4)


@pytest.mark.parametrize("threshold, share, active", [(1e9, None, [1, 1, 1]), (1e-12, None, [1, 2, 3]),
                                                      (1e9, 2, [1, 1, 2])])
def test_novelty_rule_grows_or_reuses_with_sdlora_steps(threshold, share, active, tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path, novelty_threshold=threshold, max_share=share, **NOVELTY)
    learner.run(dm)
    m = learner.metrics
    assert m["active_adapters"] == active
    assert m["train_steps"] == [4, 4, 4]  # 32 images, batch 16, 2 epochs: no trial
    rec = torch.load(tmp_path / "growth_task_2.pt", weights_only=True)
    nov = NoveltyGrowth(learner)
    stats = [load_tensors(tmp_path / f"token_stats_task_{t}.safetensors") for t in range(3)]
    served = [t for t in nov.served(rec["reopened"]) if t < 2]  # the tasks it served when task 2 began
    ref_mean = torch.stack([stats[t]["mean"] for t in served]).mean(0)
    ref_var = torch.stack([stats[t]["var"] for t in served]).mean(0)
    assert rec["novelty"] == pytest.approx(standardised_shift(stats[2]["mean"], ref_mean, ref_var))
    assert rec["full"] is (share == 2) and [g["novelty"] for g in m["growth"]][1] == rec["novelty"]


def test_a_shifted_task_is_novel_and_a_plain_one_is_not(tiny, tmp_path):
    """On the same generated classes, showing task 2 greyscale-inverted moves its tokens far more than new
    classes do: the signal measures the images' domain."""
    vals = {}
    for shift in ([], [2]):
        learner, dm = learner_for(tiny, tmp_path / str(shift), novelty_threshold=1e9, shift_tasks=shift, **NOVELTY)
        learner.run(dm)
        vals[tuple(shift)] = learner.metrics["growth"][1]["novelty"]
    assert vals[(2,)] > 3 * vals[()]


def test_novelty_run_resumes_to_the_uninterrupted_numbers(tiny, tmp_path):
    learner, dm = learner_for(tiny, tmp_path / "probe", novelty_threshold=1e9, **NOVELTY)
    learner.run(dm)
    mid = sorted(g["novelty"] for g in learner.metrics["growth"])
    cfg = dict(tiny, novelty_threshold=float(np.mean(mid)), **NOVELTY)  # between the two: decisions that matter
    got, want = resumed_and_uninterrupted(cfg, tmp_path, cut=2)
    for key in ("accuracy_matrix", "A", "active_adapters", "growth", "train_steps"):
        assert got[key] == want[key], key


def test_the_probe_script_measures_what_the_rule_measured(tiny, tmp_path, capsys):
    """benchmarks/need_probe.py --novelty: task 1 against task 0 at the middle block is the rule's own signal."""
    import json
    from benchmarks import need_probe
    from tests.conftest import run_config
    run = run_config(dict(tiny, novelty_threshold=1e9, **NOVELTY), tmp_path)
    assert need_probe.main([str(run), "--novelty", "--blocks", "0", "1", "--kinds", "grey_invert",
                            "--json", str(tmp_path / "n.json")]) == 0
    rows = json.loads((tmp_path / "n.json").read_text())
    rule = json.loads((run / "metrics.json").read_text())["growth"][0]["novelty"]  # task 1, block 0 of 2
    assert rows[0]["task"] == 1 and rows[0]["plain"][0] == pytest.approx(rule, rel=1e-4)
    assert rows[0]["grey_invert"][0] > rows[0]["plain"][0]


def test_the_replay_script_makes_the_rules_decisions(tiny, tmp_path):
    """benchmarks/novelty_decisions.py replays the rule from token statistics alone: on a shifted stream its
    novelty per task and where it grows equal a trained run's record, at a threshold that splits the tasks."""
    from benchmarks import novelty_decisions as nd
    cols = nd.seed_stats(build_config(dict(tiny, novelty_threshold=1.0, **NOVELTY)), 7, ["grey_invert"])
    stats = nd.stream(cols, "grey_invert", [2])
    probe = nd.replay(stats, 1e9, None)
    assert len(probe) == 2 and probe[1]["novelty"] > probe[0]["novelty"]
    threshold = (probe[0]["novelty"] + probe[1]["novelty"]) / 2  # task 1 reuses, shifted task 2 grows
    learner, dm = learner_for(tiny, tmp_path, novelty_threshold=threshold, shift_tasks=[2], **NOVELTY)
    learner.run(dm)
    rec = nd.replay(stats, threshold, None)
    assert [r["novelty"] for r in rec] == pytest.approx([g["novelty"] for g in learner.metrics["growth"]], rel=1e-4)
    assert nd.grew_at(rec) == [0, 2] and learner.metrics["active_adapters"] == [1, 1, 2]


def test_nearest_reference_does_not_grow_on_a_return_to_an_earlier_domain(tiny, tmp_path):
    """Task 1 shifted, task 2 plain again: against the latest adapter (task 1's) task 2 is novel, against the
    nearest (task 0's) it is not, so "nearest" reuses where "latest" grows; the run's records equal the replay."""
    from benchmarks import novelty_decisions as nd
    cols = nd.seed_stats(build_config(dict(tiny, novelty_threshold=1.0, **NOVELTY)), 7, ["grey_invert"])
    stats = nd.stream(cols, "grey_invert", [1])
    plain = nd.novelty_against(stats, 2, [0])
    shifted = min(nd.novelty_against(stats, 1, [0]), nd.novelty_against(stats, 2, [1]))
    assert shifted > 2 * plain
    threshold = (plain + shifted) / 2
    for reference, grew, active in (("latest", [0, 1, 2], [1, 2, 3]), ("nearest", [0, 1], [1, 2, 2])):
        learner, dm = learner_for(tiny, tmp_path / reference, novelty_threshold=threshold, shift_tasks=[1],
                                  novelty_reference=reference, **NOVELTY)
        learner.run(dm)
        rec = nd.replay(stats, threshold, None, reference)
        assert nd.grew_at(rec) == grew and learner.metrics["active_adapters"] == active, reference
        got = learner.metrics["growth"]
        assert [g["novelty"] for g in got] == pytest.approx([r["novelty"] for r in rec], rel=1e-4)
        assert got[1]["nearest"] == (0 if reference == "nearest" else 1) and got[1]["reopened"] == 1


def test_reopen_nearest_trains_the_adapter_of_the_tasks_domain(tiny, tmp_path):
    """Tasks 1 and 3 shifted, 0 and 2 plain. With novelty_reopen "nearest", plain task 2 reopens task 0's adapter
    and shifted task 3 reopens task 1's (reopening the latest would train adapter 1 on both); each reopened
    adapter's factors move in its task and the other's do not; the records equal the replay; a run stopped after
    task 2 and resumed makes task 3's decision as the uninterrupted run does."""
    from benchmarks import novelty_decisions as nd
    cfg = dict(tiny, synthetic_classes=8, **NOVELTY)
    cols = nd.seed_stats(build_config(dict(cfg, novelty_threshold=1.0)), 7, ["grey_invert"])
    stats = nd.stream(cols, "grey_invert", [1, 3])
    same = max(nd.novelty_against(stats, 2, [0]), nd.novelty_against(stats, 3, [1]))  # within a domain
    other = min(nd.novelty_against(stats, 1, [0]), nd.novelty_against(stats, 2, [1]),
                nd.novelty_against(stats, 3, [0, 2]))
    assert other > 2 * same
    rule = dict(novelty_threshold=(same + other) / 2, shift_tasks=[1, 3], novelty_reference="nearest",
                novelty_reopen="nearest")
    learner, dm = learner_for(cfg, tmp_path / "run", **rule)
    learner.run(dm)
    rec = nd.replay(stats, rule["novelty_threshold"], None, "nearest", "nearest")
    assert nd.grew_at(rec) == [0, 1] and nd.owners(rec) == [0, 1, 0, 1]
    got = learner.metrics["growth"]
    assert [(g["grow"], g["reopened"], g["nearest"]) for g in got] == [(True, 0, 0), (False, 0, 0), (False, 1, 1)]
    assert [g["novelty"] for g in got] == pytest.approx([r["novelty"] for r in rec], rel=1e-4)
    assert [learner.net.backbone.owner(t) for t in range(4)] == [0, 1, 0, 1]
    ck = [load_tensors(tmp_path / "run" / f"task_{t}.safetensors") for t in range(4)]
    A = "adapter.0.A"
    assert not torch.equal(ck[0][A], ck[2][A]) and not torch.equal(ck[1][A], ck[3][A])  # each trained again
    assert torch.equal(learner.net.backbone.layers[0].lora_A["0"], ck[2][A])  # task 3 left adapter 0 alone
    latest, _ = learner_for(cfg, tmp_path / "latest", **dict(rule, novelty_reopen="latest"))
    latest.run(_)
    assert [latest.net.backbone.owner(t) for t in range(4)] == [0, 1, 1, 1]
    (tmp_path / "resume").mkdir()
    resumed, full = resumed_and_uninterrupted(dict(cfg, **rule), tmp_path / "resume", cut=3, tasks=4)
    for key in ("growth", "accuracy_matrix", "active_adapters"):
        assert resumed[key] == full[key], key


@pytest.mark.parametrize("over, match", [
    (dict(novelty_reopen="nearest"), "'novelty_reopen' only applies with 'novelty_threshold'"),
    (dict(novelty_threshold=0.1, novelty_reopen="nearest"), 'needs "novelty_reference": "nearest"'),
])
def test_novelty_reopen_needs_the_rule_and_the_nearest_reference(tiny, over, match):
    with pytest.raises(ConfigError, match=match):
        build_config(dict(tiny, **NOVELTY, **over))


def test_novelty_reference_needs_the_rule(tiny):
    with pytest.raises(ConfigError, match="'novelty_reference' only applies with 'novelty_threshold'"):
        build_config(dict(tiny, novelty_reference="nearest", **NOVELTY))


def test_the_replay_summary_counts_shifted_and_other_tasks():
    from benchmarks.novelty_decisions import summary
    rec = [{"task": t} for t in range(1, 10)]
    out = [dict(reference="nearest", threshold=0.05, shift_tasks=[3, 4, 8], grew_at=[0, 3, 8], records=rec,
                owners=[0, 0, 0, 3, 3, 3, 3, 3, 8, 8]),  # 5, 6, 7, 9 (plain) on a shifted adapter: 6 at home
           dict(reference="nearest", threshold=0.05, shift_tasks=[2, 5, 7], grew_at=[0, 2, 3], records=rec,
                owners=[0, 0, 2, 3, 3, 2, 3, 2, 3, 3]),  # every task at home
           dict(reference="nearest", threshold=0.05, shift_tasks=[], grew_at=[0, 5], records=rec,
                owners=[0] * 5 + [5] * 5)]
    assert summary(out).splitlines()[1] == "nearest | 0.05 | 3/6, 1/12, 3.00, 16/20 | 2.00, [0,5]"


def test_owners_follow_growth_and_reopening():
    from benchmarks.novelty_decisions import owners, same_domain
    rec = [{"task": 1, "grow": False, "reopened": 0}, {"task": 2, "grow": True, "reopened": 0},
           {"task": 3, "grow": False, "reopened": 0}, {"task": 4, "grow": False, "reopened": 2}]
    assert owners(rec) == [0, 0, 2, 0, 2]
    assert same_domain([0, 0, 2, 0, 2], shifted=[2, 4]) == 5 and same_domain([0, 0, 2, 2, 2], shifted=[2, 4]) == 4
