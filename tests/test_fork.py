"""Runs that fork (--fork_from RUN_DIR --fork_task k): the parent's first k tasks, a new config for the rest."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from main import main
from tests.conftest import run_config


run = run_config  # tests/conftest.py


def fork(parent: Path, k: int, *extra) -> tuple[int, Path | None]:
    logs = parent.parent
    before = set(logs.iterdir())
    code = main(["--fork_from", str(parent), "--fork_task", str(k), *extra])
    new = set(logs.iterdir()) - before
    return code, (new.pop() if new else None)


def digest(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.is_file()}


GUMBEL = dict(model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.2, phase1_fraction=0.2, epochs=5,
              gumbel_tau_schedule="phase", gate_lr=5.0, growth_cost=0.05, skip_mode="reuse", retrain="skip")


@pytest.mark.parametrize("extra", [{}, {"growth_schedule": [0, 2], "skip_mode": "reuse"}, GUMBEL])
def test_fork_at_k_equals_the_uninterrupted_run(extra, tiny, tmp_path):
    cfg = dict(tiny, **{"epochs": 2, **extra})
    parent = run(cfg, tmp_path)
    untouched = digest(parent)
    code, child = fork(parent, 2)
    assert code == 0 and digest(parent) == untouched  # the parent is only read
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (parent, child))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["A_avg"] == b["A_avg"]
    assert a["train_seconds"][:2] == b["train_seconds"][:2]  # tasks 0-1 are the parent's, not retrained
    for t in range(3):
        x, y = load_file(str(parent / f"task_{t}.safetensors")), load_file(str(child / f"task_{t}.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rec = json.loads((child / "fork.json").read_text())
    assert rec["parent"] == str(parent.resolve()) and rec["fork_task"] == 2
    want = ["task_0.safetensors", "task_1.safetensors"]
    if extra is GUMBEL:  # the growth rule's per-task records come along
        want = ["beta_values_task_0.pt", "beta_values_task_1.pt"] + want
        assert torch.equal(load_file(str(parent / "task_2.safetensors"))["gate.pruning_mask"],
                           load_file(str(child / "task_2.safetensors"))["gate.pruning_mask"])
    assert rec["copied"] == want
    # a forked folder resumes like any other
    assert main(["--resume", str(child)]) == 0


def test_a_fork_continues_under_a_new_config(tiny, tmp_path):
    parent = run(dict(tiny, epochs=2, max_tasks=2), tmp_path)  # tasks 0-1 only
    code, child = fork(parent, 1, "--growth_schedule", "[0, 2]", "--skip_mode", "reuse", "--epochs", "1")
    assert code == 0
    cfg = json.loads((child / "config.json").read_text())
    assert cfg["growth_schedule"] == [0, 2] and cfg["epochs"] == 1 and cfg["max_tasks"] == 2
    m = json.loads((child / "metrics.json").read_text())
    assert len(m["A"]) == 2 and m["active_adapters"] == [1, 1]  # task 1 reused adapter 0
    assert int(load_file(str(child / "task_1.safetensors"))["adapter.owner"]) == 0
    p = json.loads((parent / "metrics.json").read_text())
    assert m["accuracy_matrix"][0] == p["accuracy_matrix"][0]
    assert int(load_file(str(parent / "task_1.safetensors"))["adapter.owner"]) == 1  # the parent grew at 1
    assert "Done: A_last" in (child / "train.log").read_text()  # a fork ends as a new run does (run.sh reads it)


@pytest.mark.parametrize("args, needle", [
    (["--fork_task", "4"], "has completed tasks 0..2; fork at a task in 1..3"),
    (["--fork_task", "0"], "fork at a task in 1..3"),
    (["--img_size", "40"], "'img_size' = 40 differs from the parent's 32"),
    (["--seed", "8"], "must be the parent's seed 7"),
    (["--shift_tasks", "[1]"], "'shift_tasks' = [1] differs from the parent's [] below task 2"),
    (["--growth_schedule", "[0, 2]"], "the parent grew adapters at [0, 1]"),
    (["--model_name", "seq_lora"], "'model_name' = \"seq_lora\" differs"),
])
def test_what_must_match_is_refused_before_any_folder(args, needle, tiny, tmp_path, capsys):
    parent = run(dict(tiny, epochs=1), tmp_path)
    k = args[1] if args[0] == "--fork_task" else "2"
    rest = args[2:] if args[0] == "--fork_task" else args
    before = set(parent.parent.iterdir())
    assert main(["--fork_from", str(parent), "--fork_task", k, *rest]) == 2
    assert needle in capsys.readouterr().err
    assert set(parent.parent.iterdir()) == before  # no run folder was made


def test_fork_needs_both_flags_and_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--fork_from", str(tmp_path)])
    assert main(["--fork_from", str(tmp_path), "--fork_task", "1"]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("rule", [{"growth_schedule": [0, 2], "skip_mode": "reuse"},
                                  {"drift_threshold": 1e-9, "skip_mode": "reuse"}])
def test_a_growth_rule_forked_after_sdlora_task_0_equals_its_run_from_scratch(rule, tiny, tmp_path):
    """What run.sh curve FORK=1 relies on: a schedule's or the drift rule's task 0 is SD-LoRA's, so a fork of the
    SD-LoRA run at task 1 gives the rule's run bit for bit."""
    alone = run(dict(tiny, epochs=2, **rule), tmp_path, "rule.json")
    parent = run(dict(tiny, epochs=2), tmp_path, "sdlora.json")
    code, child = fork(parent, 1, *[a for k, v in rule.items() for a in (f"--{k}", json.dumps(v))])
    assert code == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (alone, child))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["active_adapters"] == b["active_adapters"]
    for t in range(3):
        x, y = load_file(str(alone / f"task_{t}.safetensors")), load_file(str(child / f"task_{t}.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x)


FIT = {"need_threshold": 0.8, "need_signal": "fit", "skip_mode": "reuse", "epochs": 3, "trial_epochs": 1}


NOVELTY = {"novelty_threshold": 0.05, "max_share": 2, "skip_mode": "reuse"}


@pytest.mark.parametrize("rule", [{}, FIT, NOVELTY, {"growth_schedule": [0, 2], "skip_mode": "reuse"}, GUMBEL])
def test_a_shifted_stream_forked_from_the_plain_one_at_its_first_shift_equals_its_run_from_scratch(rule, tiny,
                                                                                                   tmp_path):
    """What run.sh need relies on: a stream whose first shifted task is k has the plain stream's tasks 0..k-1."""
    cfg = dict(tiny, **{"epochs": 2, **rule})
    shifted = {"shift_tasks": [2], "shift_kind": "rot180"}
    alone = run(dict(cfg, **shifted), tmp_path, "shifted.json")
    parent = run(cfg, tmp_path, "plain.json")
    code, child = fork(parent, 2, "--shift_tasks", "[2]", "--shift_kind", '"rot180"')
    assert code == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (alone, child))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["active_adapters"] == b["active_adapters"]
    assert a.get("growth") == b.get("growth")
    x, y = load_file(str(alone / "task_2.safetensors")), load_file(str(child / "task_2.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("rule", [FIT, dict(FIT, need_signal="gain", need_threshold=0.0), dict(NOVELTY, epochs=2)])
def test_a_need_rule_forked_after_sdlora_task_0_equals_its_run_from_scratch(rule, tiny, tmp_path):
    alone = run(dict(tiny, **rule), tmp_path, "rule.json")
    parent = run(dict(tiny, epochs=rule["epochs"]), tmp_path, "sdlora.json")
    code, child = fork(parent, 1, *[a for k, v in rule.items() for a in (f"--{k}", json.dumps(v))])
    assert code == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (alone, child))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["growth"] == b["growth"]
    assert a["active_adapters"] == b["active_adapters"]
