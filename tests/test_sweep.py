"""utils/sweep: sweep files resolved and checked before anything starts; the planner on made-up run folders; the
local executor on tiny demo rows (a fork child, a rerun that starts nothing, a stopped run resumed); the SLURM
executor with stand-in sbatch / sacct / srun on PATH (as submitit's own tests do); the shipped exps/sweeps files
as run.sh ran them."""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.sweep.cli import run as sweep
from utils.sweep.command import main_args
from utils.sweep.local import find_gpus, slot_env
from utils.sweep.plan import Status, plan
from utils.sweep.spec import read_sweep

ROOT = Path(__file__).resolve().parents[1]

#: The demo config cut to a few-second run: 3 tasks of 2 generated classes on a 2-block ViT.
SMALL = {"progress": False, "synthetic_classes": 6, "train_per_class": 16, "test_per_class": 8, "epochs": 1,
         "backbone_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}}


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep files name configs from the repository root, as run.sh runs them


def write(tmp_path: Path, sweep_file: dict, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(sweep_file))
    return path


def made_up(log_dir: Path, run_id: str, done: int, planned: int = 3, name: str = "run") -> Path:
    """A run folder LOG_DIR/<run id>/<name>/ that has finished ``done`` of ``planned`` tasks (metrics.json)."""
    folder = log_dir / run_id / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    if done:
        (folder / "metrics.json").write_text(json.dumps(
            {"A": [50.0] * done, "accuracy_matrix": [[50.0] * (t + 1) for t in range(done)], "tasks_planned": planned}))
    return folder


LEAST = {"rows": [{"name": "a", "config": "exps/demo.json", "seeds": [1993], "overrides": {"progress": False}},
                  {"name": "b", "config": "exps/demo.json", "seeds": [1993], "parent": "a", "fork_task": 2}]}


# ---- sweep files ------------------------------------------------------------------------------------------
def test_the_least_sweep_file_is_two_runs_one_forking_the_other(tmp_path):
    s = read_sweep(write(tmp_path, LEAST))
    a, b = s.runs
    assert (a.id, a.seed, a.parent, a.overrides) == ("a_1993", 1993, None, {"progress": False})
    assert (b.id, b.parent, b.fork_task) == ("b_1993", "a_1993", 2)
    assert read_sweep(write(tmp_path, LEAST), fork=False).runs[1].parent is None  # --no_fork: from scratch


def test_grids_variants_and_variables_expand_into_named_rows(tmp_path):
    f = {"vars": {"SEEDS": "1 2", "DRIFTS": "0.1 0.2", "P": "x", "ON": "0"}, "seeds": "{SEEDS}",
         "defaults": {"config": "exps/demo.json", "overrides": {"prefix": "{P}_{name}"}},
         "variant_sets": {"shift": {"348": {"overrides": {"shift_tasks": [3, 4, 8]}, "fork_task": 3}}},
         "rows": [{"name": "base"},
                  {"name": "sched{growth_schedule}", "grid": {"growth_schedule": [[0, 5], [0, 3, 6]]},
                   "overrides": {"skip_mode": "reuse"}, "parent": "base", "fork_task": 1},
                  {"name": "drift{drift_threshold}_r{lora_rank}", "grid": {"drift_threshold": "{DRIFTS}",
                                                                            "lora_rank": {"lo": 2, "hi": 8}}},
                  {"name": "{variant}_base", "variants": "shift", "parent": "base"},
                  {"name": "one", "seeds": [7], "seed_in_name": False, "enabled": "{ON}"},
                  {"name": "none", "seeds": None}]}
    s = read_sweep(write(tmp_path, f), check=False)
    ids = [r.id for r in s.runs]
    assert ids[:8] == ["base_1", "sched05_1", "sched036_1", "drift0.1_rlo_1", "drift0.1_rhi_1", "drift0.2_rlo_1",
                       "drift0.2_rhi_1", "348_base_1"] and ids[8] == "base_2" and ids[-1] == "none"
    by = s.by_id()
    assert by["sched036_2"].overrides == {"prefix": "x_sched036", "growth_schedule": [0, 3, 6], "skip_mode": "reuse"}
    assert (by["sched036_2"].parent, by["sched036_2"].fork_task) == ("base_2", 1)
    assert by["drift0.2_rhi_1"].overrides["drift_threshold"] == 0.2 and by["drift0.2_rhi_1"].overrides["lora_rank"] == 8
    assert (by["348_base_1"].overrides["shift_tasks"], by["348_base_1"].fork_task) == ([3, 4, 8], 3)
    assert by["none"].seed is None and "one" not in by  # enabled "{ON}" = 0
    s = read_sweep(write(tmp_path, f), sets={"ON": "1", "DRIFTS": ""}, env={"P": "y", "HOME": "elsewhere"},
                   seeds=[5], check=False)
    assert s.by_id()["one"].seed == 7 and not any(r.id.startswith("drift") for r in s.runs)
    assert s.by_id()["base_5"].overrides["prefix"] == "y_base"


@pytest.mark.parametrize("rows, needle", [
    ([{"name": "a", "config": "exps/demo.json", "seed": [1]}], "rows[0] ('a'): unknown field(s) ['seed']"),
    ([{"name": "a", "config": "exps/demo.json", "overrides": {"lrat": 0.1}}],
     "row 'a' (run a): unknown config key 'lrat'"),
    ([{"name": "a", "config": "exps/nope.json"}], "row 'a' (run a): config file 'exps/nope.json' does not exist"),
    ([{"name": "a", "config": "exps/demo.json"}, {"name": "b", "config": "exps/demo.json", "parent": "c",
                                                   "fork_task": 1}], "row 'b': parent 'c' is not a row"),
    ([{"name": "a", "config": "exps/demo.json", "parent": "b", "fork_task": 1},
      {"name": "b", "config": "exps/demo.json", "parent": "a", "fork_task": 1}], "row 'a': its parents form a cycle"),
    ([{"name": "a", "config": "exps/demo.json"}, {"name": "b", "config": "exps/demo.json", "parent": "a"}],
     "row 'b': parent 'a' needs fork_task"),
    ([{"name": "a", "config": "exps/demo.json"}, {"name": "a", "config": "exps/demo.json"}], "a second run named 'a'"),
    ([{"name": "a{X}", "config": "exps/demo.json"}], "unknown placeholder {X}"),
    ([{"name": "a b", "config": "exps/demo.json"}], "run name 'a b' must be letters"),
])
def test_a_bad_row_is_refused_with_exit_2_naming_it_before_anything_starts(tmp_path, capsys, rows, needle):
    logs = tmp_path / "logs"
    assert sweep([str(write(tmp_path, {"rows": rows})), "--log_dir", str(logs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep: ") and err.count("\n") == 1 and needle in err, err
    assert not logs.exists()


def test_bad_options_are_refused_with_exit_2(tmp_path, capsys):
    f = str(write(tmp_path, LEAST))
    for argv, needle in ((["--set", "X=1"], "declares no variable X"), (["--only", "("], "--only '('"),
                         (["--seed", "3"], "override --seed"), (["--lrat", "1"], "unknown config key 'lrat'"),
                         (["--jobs", "0"], "--jobs 0")):
        assert sweep([f, "--log_dir", str(tmp_path / "logs"), *argv]) == 2
        assert needle in capsys.readouterr().err


def test_the_driver_checks_the_configs_in_a_child_and_never_imports_torch(tmp_path):
    """The driver waits beside its runs for hours: the configs are checked in a child (torch and every method,
    400 MB), with the child's error raised as the driver's own."""
    import subprocess
    good = {"name": "a", "config": "exps/demo.json", "overrides": SMALL}
    bad = {"name": "b", "config": "exps/demo.json", "overrides": {"lrat": 1}}
    probe = ("import sys; from utils.sweep.cli import run; code = run(sys.argv[1:]); "
             "print('exit', code, 'torch' in sys.modules)")
    for rows, says, code in (([good], "", 0), ([good, bad], "row 'b' (run b): unknown config key 'lrat'", 2)):
        f = str(write(tmp_path, {"rows": rows}))
        done = subprocess.run([sys.executable, "-c", probe, f, "--executor", "dry",
                               "--log_dir", str(tmp_path / "logs")], capture_output=True, text=True, cwd=ROOT)
        assert done.stdout.strip().endswith(f"exit {code} False"), (done.stdout, done.stderr)
        assert says in done.stderr


# ---- the planner --------------------------------------------------------------------------------------------
def test_the_planner_reads_each_run_state_from_its_run_folder(tmp_path):
    rows = [{"name": n, "config": "exps/demo.json", "seeds": [1]} for n in ("done", "stopped", "new", "short",
                                                                              "two", "held", "other")]
    rows += [{"name": f"kid_{p}", "config": "exps/demo.json", "seeds": [1], "parent": p, "fork_task": 2}
             for p in ("done", "stopped", "new", "short", "two", "other")]
    s = read_sweep(write(tmp_path, {"rows": rows}), check=False)
    logs = tmp_path / "logs"
    done, stopped = made_up(logs, "done_1", 3), made_up(logs, "stopped_1", 1)
    made_up(logs, "short_1", 1, planned=1)                 # finished after 1 task (max_tasks): cannot fork at 2
    made_up(logs, "two_1", 3, name="r1"), made_up(logs, "two_1", 1, name="r2")
    made_up(logs, "held_1", 1)
    made_up(logs, "kid_done_1", 0)                         # started, no task finished yet
    (logs / "kid_stopped_1").mkdir()                       # a log_dir with no run folder (cut before config.json)
    selected = {r.id for r in s.runs} - {"other_1"}
    fd = os.open(logs / "held_1" / "run" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"pid 1 on elsewhere")
        fcntl.flock(fd, fcntl.LOCK_EX)                     # as main.py's RunLock holds a folder it trains
        steps = plan(s.runs, logs, selected, failed=frozenset({"new_1"}))
    finally:
        os.close(fd)
    got = {rid: (st.status, st.reason) for rid, st in steps.items()}
    assert {rid: st for rid, (st, _) in got.items()} == {
        "done_1": Status.DONE, "stopped_1": Status.STOPPED, "new_1": Status.FAILED, "short_1": Status.DONE,
        "two_1": Status.BROKEN, "held_1": Status.RUNNING, "other_1": Status.READY,
        "kid_done_1": Status.STOPPED, "kid_stopped_1": Status.WAITING, "kid_new_1": Status.BLOCKED,
        "kid_short_1": Status.BLOCKED, "kid_two_1": Status.BLOCKED, "kid_other_1": Status.BLOCKED}
    assert "2 run folders" in got["two_1"][1] and "pid 1 on elsewhere" in got["held_1"][1]
    assert "for stopped_1 to finish task 1 (1 done)" in got["kid_stopped_1"][1]
    assert "is finished" in got["kid_short_1"][1] and "failed" in got["kid_new_1"][1]
    assert "not selected" in got["kid_other_1"][1]
    assert main_args(steps["stopped_1"], logs, {}, None) == ["--resume", str(stopped)]
    assert main_args(steps["kid_done_1"], logs, {}, steps["done_1"])[:2] == \
        ["--resume", str(logs / "kid_done_1" / "run")]
    made_up(logs, "stopped_1", 2)                          # the parent reaches task 2: the child may fork it
    steps = plan(s.runs, logs, selected)
    assert steps["kid_stopped_1"].status is Status.READY and steps["new_1"].status is Status.READY
    args = main_args(steps["kid_stopped_1"], logs, {"epochs": 1}, steps["stopped_1"])
    assert args == ["--fork_from", str(stopped), "--fork_task", "2", "--config", "exps/demo.json", "--seed", "1",
                    "--epochs", "1", "--log_dir", str(logs / "kid_stopped_1")]
    assert done.exists()


def test_slots_get_one_thread_and_one_gpu_each():
    assert find_gpus("0,2") == ["0", "2"] and find_gpus("none") == []
    env = slot_env(3, 2, ["0", "2"], base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in slot_env(0, 1, [], base={}) and "CUDA_VISIBLE_DEVICES" not in slot_env(0, 1, [], {})


# ---- the local executor, end to end -------------------------------------------------------------------------
def test_the_local_executor_runs_a_fork_child_to_the_end_and_a_second_run_starts_nothing(tmp_path, capsys):
    from utils.fork import cut_metrics
    f = write(tmp_path, {"defaults": {"config": "exps/demo.json", "overrides": SMALL}, "seeds": [1993],
                         "rows": [{"name": "a"}, {"name": "b", "parent": "a", "fork_task": 2,
                                                  "overrides": {"lrate": 0.001}}]})
    logs = tmp_path / "logs"
    argv = [str(f), "--jobs", "2", "--log_dir", str(logs), "--poll", "0.2"]
    assert sweep(argv + ["--progress_every", "0"]) == 0
    out = capsys.readouterr().out
    assert "=== b_1993: waits for a_1993 to finish task 1" in out and "=== b_1993: done (3/3 tasks" in out
    assert "... a_1993: " in out  # progress lines: the tasks its folder lists, the seconds it has run
    (a,), (b,) = (logs / "a_1993").iterdir(), (logs / "b_1993").iterdir()
    assert json.loads((b / "fork.json").read_text())["parent"] == str(a.resolve())
    assert len(json.loads((b / "metrics.json").read_text())["A"]) == 3 and list(logs.glob("report_*"))
    assert "Done:" in (logs / "b_1993.out").read_text()

    assert sweep(argv + ["--no_report"]) == 0  # everything finished: nothing starts
    out = capsys.readouterr().out
    assert "starts" not in out and "resumes" not in out and out.count("finished before") == 2

    metrics = json.loads((b / "metrics.json").read_text())  # b as if stopped after task 1: it is resumed
    (b / "metrics.json").write_text(json.dumps(cut_metrics(metrics, 2)))
    for p in b.glob("*task_2.*"):
        p.unlink()
    assert sweep(argv + ["--no_report"]) == 0
    out = capsys.readouterr().out
    assert f"=== b_1993: resumes at 2/3 tasks: {sys.executable} main.py --resume {b}" in out
    assert "a_1993: finished before" in out and len(json.loads((b / "metrics.json").read_text())["A"]) == 3


# ---- the SLURM executor with stand-ins for sbatch, sacct and srun -------------------------------------------
SBATCH = """#!PYTHON
import json, re, shutil, sys
from pathlib import Path
spool = Path(__file__).parent
n = len(list(spool.glob("sbatch_*.sh")))
text = Path(sys.argv[-1]).read_text()
shutil.copy(sys.argv[-1], spool / f"sbatch_{n}.sh")
job = str(12 + n)
states = json.loads((spool / "states.json").read_text()) if (spool / "states.json").exists() else {}
m = re.search(r"--array=0-(\\d+)", text)
states.update({f"{job}_{i}": "PENDING" for i in range(int(m.group(1)) + 1)} if m else {job: "PENDING"})
(spool / "states.json").write_text(json.dumps(states))
print(f"Submitted batch job {job}")
"""
SACCT = """#!PYTHON
import json, sys
from pathlib import Path
states = json.loads((Path(__file__).parent / "states.json").read_text())
asked = {sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"}
print("JobID|State|NodeList")
for jid, state in states.items():
    if jid.split("_")[0] in asked:
        print(f"{jid}|{state}|node1")
"""


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """sbatch, sacct and srun stand-ins on PATH; returns their folder (sbatch_N.sh: each submission's file)."""
    submitit = pytest.importorskip("submitit")
    spool = tmp_path / "bin"
    spool.mkdir()
    for name, text in (("sbatch", SBATCH), ("sacct", SACCT), ("srun", '#!/bin/sh\nexec "$@"\n')):
        (spool / name).write_text(text.replace("PYTHON", sys.executable))
        (spool / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{spool}{os.pathsep}{os.environ['PATH']}")
    submitit.slurm.slurm.SlurmJob.watcher.clear()
    return spool


def set_states(spool: Path, **states: str) -> None:
    path = spool / "states.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **states)))


def test_slurm_submits_one_array_with_a_limit_then_children_after_their_parent_job(tmp_path, cluster, capsys):
    f = write(tmp_path, {"seeds": [1, 2, 3], "slurm": {"time": 60, "cpus_per_task": 4},
                         "rows": [{"name": "a", "config": "exps/demo.json"},
                                  {"name": "b", "config": "exps/demo.json", "parent": "a", "fork_task": 2}]})
    logs = tmp_path / "logs"
    argv = [str(f), "--executor", "slurm", "--children", "afterok", "--jobs", "2", "--log_dir", str(logs),
            "--slurm", "partition=gpu"]
    assert sweep(argv) == 0
    files = sorted(cluster.glob("sbatch_*.sh"))
    assert len(files) == 4  # a_1..3 as one array, then b_s after a_s's task of the array
    first = files[0].read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=60", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --job-name=sweep_s", "#SBATCH --signal=USR2@90"):
        assert line in first
    deps = sorted(next(row for row in p.read_text().splitlines() if "--dependency" in row) for p in files[1:])
    assert deps == [f"#SBATCH --dependency=afterok:12_{i}" for i in range(3)]
    assert "#SBATCH --kill-on-invalid-dep=yes" in files[1].read_text() and "kill-on-invalid-dep" not in first
    record = json.loads((logs / ".slurm_jobs.json").read_text())
    assert record == {"a_1": "12_0", "a_2": "12_1", "a_3": "12_2", "b_1": "13", "b_2": "14", "b_3": "15"}
    capsys.readouterr()
    assert sweep(argv) == 0  # the same command again: the queued jobs are followed, not submitted twice
    assert len(list(cluster.glob("sbatch_*.sh"))) == 4
    assert capsys.readouterr().out.count("is in the queue (submitted before)") == 6


def test_without_submitit_only_the_slurm_executor_is_refused_and_says_how_to_install_it(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails, as where the extra is not installed
    f = str(write(tmp_path, LEAST))
    assert sweep([f, "--executor", "slurm", "--log_dir", str(tmp_path / "logs")]) == 2
    assert 'pip install -e ".[cluster]"' in capsys.readouterr().err
    assert sweep([f, "--executor", "dry", "--log_dir", str(tmp_path / "logs")]) == 0


def test_slurm_refuses_an_unknown_parameter_before_anything_is_written(tmp_path, cluster, capsys):
    logs = tmp_path / "logs"
    assert sweep([str(write(tmp_path, LEAST)), "--executor", "slurm", "--log_dir", str(logs), "--slurm", "gpus=1"]) == 2
    assert "Unavailable parameter(s): ['gpus']" in capsys.readouterr().err and not logs.exists()
    assert not list(cluster.glob("sbatch_*.sh"))


def test_slurm_submits_a_child_once_its_parent_has_the_task_it_forks_at(tmp_path, cluster):
    from utils.sweep.drive import Drive
    from utils.sweep.slurm import SlurmLauncher, make_executor
    s = read_sweep(write(tmp_path, LEAST))
    logs = tmp_path / "logs"
    parent = made_up(logs, "a_1993", 1)       # stopped after task 0
    lines: list[str] = []
    launcher = SlurmLauncher(4, make_executor(s, logs, 4, {}), s, logs, sys.executable, 0.0, say=lines.append)
    drive = Drive(s, ["a_1993", "b_1993"], launcher, logs, sys.executable, reports=False, say=lines.append)
    assert drive.step() and len(list(cluster.glob("sbatch_*.sh"))) == 1   # the parent, to resume
    assert any(line.startswith("=== a_1993: resumes at 1/3 tasks") and f"--resume {parent}" in line for line in lines)
    assert drive.step() and len(list(cluster.glob("sbatch_*.sh"))) == 1   # the child waits for task 1
    made_up(logs, "a_1993", 2)
    assert drive.step() and len(list(cluster.glob("sbatch_*.sh"))) == 2
    child = (cluster / "sbatch_1.sh").read_text()
    assert "--dependency" not in child and "--array" not in child and "#SBATCH --time=720" in child  # the default
    assert any(f"--fork_from {parent} --fork_task 2" in line for line in lines)
    made_up(logs, "a_1993", 3), made_up(logs, "b_1993", 3)
    set_states(cluster, **{"12": "COMPLETED", "13": "COMPLETED"})
    assert drive.step() and not drive.step()   # both jobs ended, both runs done: nothing more
    assert drive.finish(drive.plan()) == 0


STUB_MAIN = """#!PYTHON
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
args = sys.argv[2:]
open(os.environ["CALLS"], "a").write(" ".join(args) + "\\n")
d = args[args.index("--resume") + 1] if "--resume" in args else os.path.join(args[args.index("--log_dir") + 1], "run")
os.makedirs(d, exist_ok=True)
open(os.path.join(d, "config.json"), "w").write("{}")
n = 1 if os.environ.get("STUB_SLEEP") else 3
json.dump({"A": [1.0] * n, "accuracy_matrix": [[1.0] * (t + 1) for t in range(n)], "tasks_planned": 3},
          open(os.path.join(d, "metrics.json"), "w"))
time.sleep(60 if os.environ.get("STUB_SLEEP") else 0)
"""


def test_a_slurm_job_runs_its_row_and_on_preemption_stops_it_and_requeues_a_resume(tmp_path, cluster, monkeypatch):
    from utils.sweep.slurm import RowJob
    stub = tmp_path / "python"
    stub.write_text(STUB_MAIN.replace("PYTHON", sys.executable))
    stub.chmod(0o755)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    s = read_sweep(write(tmp_path, LEAST))
    logs = tmp_path / "logs"
    a, b = s.runs
    job = RowJob(a, None, str(logs), str(stub), str(ROOT))
    assert job() == str(logs / "a_1993" / "run")             # a new run, to the end
    monkeypatch.setenv("STUB_SLEEP", "1")
    child = RowJob(b, a, str(logs), str(stub), str(ROOT), {"epochs": 1})
    requeued = []

    def preempt():  # SLURM's warning, as submitit gets it: USR2 to the job's process while main.py trains
        deadline = time.monotonic() + 30
        while not (logs / "b_1993" / "run" / "metrics.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, lambda *_: requeued.append(child.checkpoint()))  # submitit's handler
    threading.Thread(target=preempt, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="exited 143"):  # main.py stopped on SIGTERM, its tasks saved
            child()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert time.monotonic() - started < 20 and len(requeued) == 1
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[1].startswith(f"--fork_from {logs / 'a_1993' / 'run'} --fork_task 2 --config exps/demo.json")
    again = pickle.loads(pickle.dumps(requeued[0].function))  # as the requeued job reads it back
    assert again.command() == ["--resume", str(logs / "b_1993" / "run")]


# ---- the shipped sweeps -------------------------------------------------------------------------------------
#: Runs per file with its default variables: the runs `bash run.sh MODE` started before it read sweep files
#: (counted with a stand-in main.py on the run.sh of commit 4bc4f06: the same names and arguments).
SHIPPED = {"default": 10, "quick": 22, "offline": 14, "inflora": 10, "inflora_causes": 22, "need": 180,
           "baselines": 3, "subspace": 19, "curve": 24, "shifted": 24, "scan": 98, "heads": 27, "long": 16}


def test_every_shipped_sweep_resolves_and_its_configs_check():
    assert sorted(p.stem for p in (ROOT / "exps" / "sweeps").glob("*.json")) == sorted(SHIPPED)
    for name, n in SHIPPED.items():
        s = read_sweep(ROOT / "exps" / "sweeps" / f"{name}.json", env={})
        assert len(s.runs) == n, name


def test_the_need_sweep_forks_each_row_from_its_parent_at_the_first_shift():
    env = {"SEEDS": "1993", "KINDS": "grey_invert", "REOPEN": "1"}
    by = read_sweep(ROOT / "exps" / "sweeps" / "need.json", env=env, check=False).by_id()
    p = "quick_unnormalised"
    for row in ("sdlora", "gumbel"):
        assert by[f"{p}_plain_{row}_1993"].parent is None
    for row in ("need0", "fit0.8", "novelty0.045", "novelty0.045_share5_nearest", "even2", "even5",
                "novelty0.045_nearest_reopen"):
        assert (by[f"{p}_plain_{row}_1993"].parent, by[f"{p}_plain_{row}_1993"].fork_task) == \
            (f"{p}_plain_sdlora_1993", 1)
    for placement, k in (("348", 3), ("257", 2), ("169", 1)):
        for row in ("sdlora", "gumbel", "fit0.8", "novelty0.045_share5", "even3"):
            run = by[f"{p}_grey_invert_{placement}_{row}_1993"]
            assert (run.parent, run.fork_task) == (f"{p}_plain_{row}_1993", k)
            assert run.overrides["shift_tasks"] == [int(c) for c in placement]
            assert run.overrides["shift_kind"] == "grey_invert" and run.overrides["prefix"] == run.row
        reopen = by[f"{p}_grey_invert_{placement}_novelty0.045_share5_nearest_reopen_1993"]
        assert reopen.parent == f"{p}_plain_novelty0.045_share5_nearest_1993"  # before task 5 only adapter 0 exists
        assert reopen.overrides["novelty_reopen"] == "nearest"
        oracle = by[f"{p}_grey_invert_{placement}_oracle_1993"]
        assert (oracle.parent, oracle.fork_task) == (f"{p}_plain_even2_1993", k)
        assert oracle.overrides["growth_schedule"] == [0] + [int(c) for c in placement]
    assert not any(r.parent for r in read_sweep(ROOT / "exps" / "sweeps" / "need.json", env=dict(env, FORK="0"),
                                                check=False).runs)


def test_run_sh_variables_still_shape_the_rows():
    quick = read_sweep(ROOT / "exps" / "sweeps" / "quick.json", env={"PROTOCOL": "offline", "TAG": "offline_"},
                       check=False).by_id()
    run = quick["offline_sdlora_1994"]
    assert run.protocol == "exps/protocols/offline.json" and run.overrides["prefix"] == "offline_sdlora"
    shifted = read_sweep(ROOT / "exps" / "sweeps" / "shifted.json", env={"SHIFT": "[2,5,7]", "FORK": "1"},
                         check=False).by_id()
    assert shifted["shifted257_sched036_1995"].overrides["shift_tasks"] == [2, 5, 7]
    assert shifted["shifted257_drift0.2_1993"].parent == "shifted257_sdlora_1993"
    offline = read_sweep(ROOT / "exps" / "sweeps" / "offline.json", env={"SINGLE_SEED_ROWS": "0"}, check=False)
    assert len(offline.runs) == 8
    sub = read_sweep(ROOT / "exps" / "sweeps" / "subspace.json", env={"SEED": "1994", "SPLIT_LR": "5"},
                     check=False).by_id()
    assert sub["sublora_d2000_learned_slr"].seed == 1994 and sub["sublora_d2000_learned_slr"].overrides["split_lr"] == 5
    assert sub["sublora_d5000_uniform_sdnorm"].overrides["subspace_lr"] == 0.1
    assert sub["sublora_d5000_fixed20"].overrides["subspace_lr"] == 0.2
