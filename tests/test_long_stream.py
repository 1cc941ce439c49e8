"""Long streams (issue 42): each task's peak memory in metrics.json (kept across a resume), a restore that reads each
earlier checkpoint's adapter only and restacks the adapters once, the long-stream protocols and sweep, and the
cost benchmark end to end."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from main import main
from tests.conftest import ROOT, learner_for, resumed_and_uninterrupted, run_config
from utils.io import load_tensors
from utils.memory import PeakMemory

MEASURED = PeakMemory(torch.device("cpu")).unavailable is None  # Linux with a resettable VmHWM (this machine)


def test_each_task_records_its_peak_memory_and_a_resume_keeps_the_finished_ones(tiny, tmp_path):
    cut, full = resumed_and_uninterrupted(tiny, tmp_path, cut=2, tasks=3)
    assert cut["accuracy_matrix"] == full["accuracy_matrix"]  # the new key changes nothing else
    for m in (cut, full):
        assert len(m["peak_memory_mb"]) == len(m["A"]) == 3
        if MEASURED:
            assert all(isinstance(v, float) and v > 0 for v in m["peak_memory_mb"])
        else:
            assert m["peak_memory_mb"] == [None] * 3


def test_a_resume_keeps_the_finished_tasks_peaks_as_the_first_process_measured_them(tiny, tmp_path):
    part = run_config(dict(tiny, max_tasks=2), tmp_path)
    before = json.loads((part / "metrics.json").read_text())["peak_memory_mb"]
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    after = json.loads((part / "metrics.json").read_text())["peak_memory_mb"]
    assert len(before) == 2 and after[:2] == before and len(after) == 3


def test_a_folder_from_before_the_key_resumes_with_null_for_its_finished_tasks(tiny, tmp_path):
    part = run_config(dict(tiny, max_tasks=2), tmp_path)
    path = part / "metrics.json"
    old = json.loads(path.read_text())
    del old["peak_memory_mb"]
    path.write_text(json.dumps(old))
    assert main(["--resume", str(part), "--max_tasks", "3"]) == 0
    peaks = json.loads(path.read_text())["peak_memory_mb"]
    assert peaks[:2] == [None, None] and len(peaks) == 3 and (peaks[2] is not None) == MEASURED


@pytest.mark.skipif(not MEASURED, reason="no resettable resident-set high-water mark here")
def test_the_cpu_peak_is_the_stretch_s_own():
    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    quiet = peak.read_mb()
    block = np.ones(200 * 2 ** 20, np.uint8)  # 200 MiB, every page touched
    busy = peak.read_mb()
    del block
    peak.reset()  # a new stretch: the block is gone and no longer counts
    after = peak.read_mb()
    assert busy - quiet > 150 and after < busy - 150


def test_a_device_without_a_measure_records_null_and_says_why():
    peak = PeakMemory(torch.device("meta"))
    peak.reset()
    assert peak.read_mb() is None and "meta" in peak.unavailable


def test_load_tensors_reads_only_the_keys_asked_for(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"adapter.0.A": torch.ones(2), "subspace.z": torch.zeros(3), "head.weight": torch.ones(4, 4)}, str(path))
    assert set(load_tensors(path, ("adapter.", "subspace."))) == {"adapter.0.A", "subspace.z"}
    assert set(load_tensors(path)) == {"adapter.0.A", "subspace.z", "head.weight"}


def test_a_restore_restacks_the_adapters_once_and_equals_the_trained_network(tiny, tmp_path, monkeypatch):
    """Restoring t tasks replays t structure changes; the blocks are configured once at the end (it was once per
    task, each restacking every frozen adapter: quadratic in t), and the network is the one training left."""
    from backbone.lora import LoRAQKV
    trained, dm = learner_for(tiny, tmp_path / "run", synthetic_classes=10, max_tasks=5)
    trained.run(dm)
    restored, _ = learner_for(tiny, tmp_path / "run", synthetic_classes=10, max_tasks=5)
    calls = []
    original = LoRAQKV.configure
    monkeypatch.setattr(LoRAQKV, "configure", lambda self, *a: calls.append(1) or original(self, *a))
    restored.restore(dm, 4)
    assert len(calls) == len(restored.net.backbone.layers)  # once per block, not 5 times
    a, b = trained.net.state_dict(), restored.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for la, lb in zip(trained.net.backbone.layers, restored.net.backbone.layers):
        assert la.frozen == lb.frozen and torch.equal(la._A_old, lb._A_old) and torch.equal(la._inv_norm, lb._inv_norm)


# ---- the long-stream protocols and sweep ----------------------------------------------------------------------
@pytest.mark.parametrize("name, tasks, classes", [("quick_50", 50, 2), ("quick_20", 20, 5)])
def test_the_long_protocols_are_the_quick_one_cut_finer(name, tasks, classes, monkeypatch):
    from utils.config import load_config
    from utils.data.data_manager import task_sizes
    monkeypatch.chdir(ROOT)
    raw = json.loads((ROOT / f"exps/protocols/{name}.json").read_text())
    quick = json.loads((ROOT / "exps/protocols/quick.json").read_text())["keys"]
    assert raw["keys"] == dict(quick, init_cls=classes, increment=classes) and raw["description"]
    cfg = load_config("exps/sdlora_c100.json", {"protocol": f"exps/protocols/{name}.json"})
    assert task_sizes(100, cfg.init_cls, cfg.increment) == [classes] * tasks


@pytest.mark.parametrize("protocol, tasks", [("quick_50", 50), ("quick_20", 20)])
def test_the_long_sweep_plans_its_rows_with_schedules_evenly_spaced_over_the_protocol_s_tasks(protocol, tasks,
                                                                                             monkeypatch):
    from utils.sweep.spec import read_sweep
    monkeypatch.chdir(ROOT)
    sweep = read_sweep("exps/sweeps/long.json", sets={"PROTOCOL": protocol})  # every row's config checked too
    runs = {r.id: r for r in sweep.runs}
    rows = ["sdlora", "even3", "even5", "even8", "novelty", "ranpac_fsa", "ranpac_fsa_r1e6", "best_lora"]
    assert list(runs) == [f"{protocol}_{row}_{seed}" for seed in (1993, 1994) for row in rows]
    for n in (3, 5, 8):  # adapter i at task floor(i T / n), as need.json and curve.json space them on 10 tasks
        run = runs[f"{protocol}_even{n}_1993"]
        assert run.overrides["growth_schedule"] == [i * tasks // n for i in range(n)]
        assert run.overrides["skip_mode"] == "reuse" and run.protocol == f"exps/protocols/{protocol}.json"
    assert runs[f"{protocol}_ranpac_fsa_1994"].overrides["first_session_adapt"] is True
    assert runs[f"{protocol}_ranpac_fsa_r1e6_1994"].overrides["ranpac_ridge"] == 1e6
    assert runs[f"{protocol}_best_lora_1993"].config == "exps/best_lora_c100.json"


def test_the_long_sweep_refuses_a_protocol_it_has_no_schedules_for(monkeypatch):
    from utils.sweep.fill import SweepError
    from utils.sweep.spec import read_sweep
    monkeypatch.chdir(ROOT)
    with pytest.raises(SweepError, match="variants 'quick' is not in \"variant_sets\" \\(quick_50, quick_20\\)"):
        read_sweep("exps/sweeps/long.json", sets={"PROTOCOL": "quick"}, check=False)


def test_run_sh_long_dry_lists_the_runs_and_starts_nothing(tmp_path):
    import os
    import subprocess
    import sys
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "EXECUTOR": "dry", "LOG_DIR": str(tmp_path / "logs"),
           "SEEDS": "1993", "PROTOCOL": "quick_20", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "long"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("=== ")]
    assert len(lines) == 8 and all("--protocol exps/protocols/quick_20.json" in line for line in lines)
    assert "=== quick_20_even5_1993 [ready]" in out.stdout and "--growth_schedule '[0,4,8,12,16]'" in out.stdout
    assert not (tmp_path / "logs").exists()


# ---- the cost benchmark ---------------------------------------------------------------------------------------
TINY_BENCH = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--batch", "8", "--rank", "4",
              "--backbone_kwargs", '{"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}',
              "--train_per_class", "8", "--test_per_class", "2", "--repeats", "1"]


def test_the_long_stream_benchmark_runs_end_to_end_and_prints_every_measure(capsys, tmp_path):
    import re
    from benchmarks import long_stream
    assert long_stream.main(["--tasks", "1", "3", "--log_dir", str(tmp_path), *TINY_BENCH]) == 0
    out = capsys.readouterr().out
    rows: dict[str, dict[int, float]] = {}
    for line in out.splitlines():  # "<measure>  <t>  <value>  <x t=1>  <x t=10>"
        m = re.fullmatch(r"(.*?)\s+(\d+)\s+([\d.]+)\s+([\d.]+|-)\s+([\d.]+|-)", line)
        if m:
            rows.setdefault(m.group(1), {})[int(m.group(2))] = float(m.group(3))
    names = ["train step", "eval per test image", "training step tensors", "bytes written", "resume, as --resume",
             "of which restore"] + (["peak memory"] if MEASURED else [])
    for name in names:
        (key,) = [k for k in rows if k.startswith(name) or k.strip().startswith(name)]
        assert set(rows[key]) == {1, 3} and all(v > 0 for v in rows[key].values()), key
    (tensors,) = [k for k in rows if k.startswith("training step tensors")]
    assert rows[tensors][3] > rows[tensors][1]  # two more adapters are held: the count sees them
    assert "bar (t=3 within 1.10x of t=10): not judged" in out
    # the run folder is a real one: 3 tasks listed; the copy after task 1 lists 1
    (run,) = (tmp_path / "runs").iterdir()
    assert len(json.loads((run / "metrics.json").read_text())["A"]) == 3
    assert len(json.loads((tmp_path / "after" / "1" / "metrics.json").read_text())["A"]) == 1


def test_bytes_written_counts_replaced_files_whole_and_appends_by_what_they_grew():
    from benchmarks.long_stream import bytes_written
    before = {"metrics.json": (1, 500, 10), "train.log": (2, 100, 10), "task_0.safetensors": (3, 900, 10)}
    after = {"metrics.json": (4, 700, 20), "train.log": (2, 160, 20), "task_0.safetensors": (3, 900, 10),
             "task_1.safetensors": (5, 950, 20)}
    assert bytes_written(before, after) == {"metrics.json": 700, "train.log": 60, "checkpoint": 950}


def test_the_benchmark_given_bad_input_says_so_in_one_line(monkeypatch, capsys):
    import sys
    from benchmarks import long_stream
    from benchmarks.cli import run
    monkeypatch.setattr(sys, "argv", ["long_stream", "--config", "/no.json"])
    assert run(long_stream.main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/no.json" in err[0]
