"""run.sh as a thin entry over python -m utils.sweep, with a stand-in for main.py: a mode is its sweep file, a
finished row is not run again and a stopped one resumes (read from the run folders), the growth-on-need batch forks
each row from the right parent at the right task, and the old environment variables still shape the rows."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Called as "$PYTHON -m utils.sweep ..." (run with the real interpreter) and as "$PYTHON main.py ARGS" by the
#: sweep: logs ARGS and makes the run folder main.py would, TASKS (10) tasks finished of TASKS planned, or 3 and
#: exit 130 when the folder matches $STUB_STOP (a run stopped part-way; its --resume finishes it).
STUB = r'''#!PYTHON
import json, os, re, sys
args = sys.argv[1:]
if args[0] in ("-m", "-c"):
    os.execv("PYTHON", ["PYTHON"] + args)
args = args[1:]
with open(os.environ["CALLS"], "a") as f:
    f.write(" ".join(args) + "\n")
if "--report" in args:
    sys.exit(0)
tasks = int(os.environ.get("TASKS", "10"))
if "--resume" in args:
    d = args[args.index("--resume") + 1]
else:
    d = os.path.join(args[args.index("--log_dir") + 1], args[args.index("--prefix") + 1] + "_run")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "config.json"), "w").write("{}")
stop = bool(os.environ.get("STUB_STOP")) and re.search(os.environ["STUB_STOP"], d) and "--resume" not in args
n = 3 if stop else tasks
json.dump({"A": [1.0] * n, "accuracy_matrix": [[1.0] * (t + 1) for t in range(n)], "tasks_planned": tasks},
          open(os.path.join(d, "metrics.json"), "w"))
sys.exit(130 if stop else 0)
'''


@pytest.fixture
def stub(tmp_path):
    exe = tmp_path / "python"
    exe.write_text(STUB.replace("PYTHON", sys.executable))
    exe.chmod(0o755)
    return exe


def run_sh(stub: Path, tmp_path: Path, *args: str, code: int = 0, **env: str) -> tuple[list[str], str]:
    """bash run.sh ARGS with the stand-in; the main.py calls it made this time (not --report), and its output."""
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    base = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "CALLS": str(calls), "LOG_DIR": str(tmp_path / "logs"),
            "SEEDS": "1993", "PROGRESS_EVERY": "600", "JOBS": "2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), *args], env=dict(base, **env), cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == code, out.stdout + out.stderr
    return [c for c in calls.read_text().splitlines() if c and not c.startswith("--report")], out.stdout + out.stderr


def test_a_finished_row_is_not_run_again_and_a_stopped_one_resumes(stub, tmp_path):
    only = {"ONLY": "^(sdlora|gumbel)_1993$"}
    first, _ = run_sh(stub, tmp_path, "quick", code=1, STUB_STOP="gumbel", **only)  # gumbel stopped: exit 1
    assert len(first) == 2 and all("--resume" not in c for c in first)
    gumbel = tmp_path / "logs" / "gumbel_1993" / "quick_gumbel_run"
    second, out = run_sh(stub, tmp_path, "quick", **only)  # sdlora finished: skipped; gumbel stopped: resumed
    assert second == [f"--resume {gumbel}"] and "=== sdlora_1993: finished before" in out
    assert run_sh(stub, tmp_path, "quick", **only)[0] == []  # both finished now
    assert (tmp_path / "logs" / "gumbel_1993.out").exists()


def test_the_need_batch_forks_each_row_from_its_parent_at_the_first_shift(stub, tmp_path):
    rows = "sdlora|gumbel|fit0.8|novelty0.045|novelty0.045_share5_nearest|even2|even3|oracle"
    calls, _ = run_sh(stub, tmp_path, "need", KINDS="grey_invert", FITS="0.8",
                      ONLY=f"^quick_unnormalised_(plain|grey_invert_348)_({rows})_1993$")
    logs = tmp_path / "logs"
    by_prefix = {c.split("--prefix ")[1].split()[0]: c for c in calls}
    p = "quick_unnormalised"
    assert sorted(by_prefix) == sorted([f"{p}_{s}_{r}" for s in ("plain", "grey_invert_348")
                                        for r in rows.split("|") if r != "oracle"] + [f"{p}_grey_invert_348_oracle"])
    run = lambda row: f"{logs}/{p}_plain_{row}_1993/{p}_plain_{row}_run"  # noqa: E731 (a plain row's run folder)
    for row in ("sdlora", "gumbel"):  # plain rows without a parent run from scratch
        assert "--fork_from" not in by_prefix[f"{p}_plain_{row}"]
    # the rest: SD-LoRA's task 0
    for row in ("fit0.8", "novelty0.045", "novelty0.045_share5_nearest", "even2", "even3"):
        assert by_prefix[f"{p}_plain_{row}"].startswith(f"--fork_from {run('sdlora')} --fork_task 1 ")
    for row in ("sdlora", "gumbel", "fit0.8", "novelty0.045_share5_nearest", "even2"):
        c = by_prefix[f"{p}_grey_invert_348_{row}"]  # a shifted row: its plain row, at the first shifted task
        assert c.startswith(f"--fork_from {run(row)} --fork_task 3 ") and "--shift_tasks [3,4,8]" in c
    assert "--novelty_reference nearest" in by_prefix[f"{p}_grey_invert_348_novelty0.045_share5_nearest"]
    oracle = by_prefix[f"{p}_grey_invert_348_oracle"]
    assert oracle.startswith(f"--fork_from {run('even2')} --fork_task 3 ") and "--growth_schedule [0,3,4,8]" in oracle


def test_a_row_whose_parent_ended_short_is_not_started_and_says_why(stub, tmp_path):
    calls, out = run_sh(stub, tmp_path, "need", code=1, KINDS="grey_invert", TASKS="2",
                        ONLY="^quick_unnormalised_(plain|grey_invert_348)_sdlora_1993$")
    # the plain SD-LoRA run finished with 2 tasks: the shifted row cannot fork at task 3, and is not started
    assert len(calls) == 1 and "plain_sdlora" in calls[0]
    assert "quick_unnormalised_grey_invert_348_sdlora_1993: blocked: parent quick_unnormalised_plain_sdlora_1993 " \
           "has 2 of the 3 tasks it forks at, and is finished" in out


def test_overrides_reach_every_run_and_dry_starts_nothing(stub, tmp_path):
    calls, out = run_sh(stub, tmp_path, "--epochs", "1", EXECUTOR="dry", SEEDS="")
    lines = [line for line in out.splitlines() if line.startswith("=== ")]
    assert calls == [] and len(lines) == 10  # the default batch: sdlora_c100 and schedule_c100, seeds 1993-1997
    assert all(" --epochs 1 " in line for line in lines) and "=== schedule_c100_1997 [ready]" in out
    _, out = run_sh(stub, tmp_path, "subspace", EXECUTOR="dry", SEED="1994", ONLY="d2000_learned")
    assert "=== sublora_d2000_learned_slr [ready]" in out and "--split_lr 10 --seed 1994 " in out


def test_unknown_modes_rerun_and_a_seed_override_are_refused_with_exit_2(stub, tmp_path):
    _, out = run_sh(stub, tmp_path, "quikc", code=2)
    assert "unknown mode 'quikc'; modes: baselines curve heads inflora inflora_causes long need offline quick scan " \
           "shifted subspace" in out
    _, out = run_sh(stub, tmp_path, "quick", code=2, RERUN="1")
    assert "RERUN=1 is gone" in out
    _, out = run_sh(stub, tmp_path, "need", code=2, EVENS="")  # an old list variable: other rows would start
    assert "EVENS is no longer read" in out
    _, out = run_sh(stub, tmp_path, "quick", "--seed", "5", code=2)
    assert "error: sweep: override --seed" in out and not (tmp_path / "logs").exists()
