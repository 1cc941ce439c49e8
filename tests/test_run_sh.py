"""run.sh's bookkeeping, with a stand-in for main.py: finished rows are not rerun, stopped rows resume, and the
growth-on-need batch forks each shared prefix from the right parent at the right task."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Called as "$PY main.py ARGS" (and "$PY -c CODE" by run.sh's helpers): logs ARGS, makes a run folder that has
#: finished TASKS tasks, and says "Done:" unless the row's prefix matches $STUB_STOP (a run stopped part-way).
STUB = r'''#!PYTHON
import json, os, re, sys
args = sys.argv[1:]
if args[0] == "-c":
    os.execv(sys.executable, [sys.executable] + args)
args = args[1:]
with open(os.environ["CALLS"], "a") as f:
    f.write(" ".join(args) + "\n")
if "--report" in args:
    sys.exit(0)
if "--resume" in args:
    d = args[args.index("--resume") + 1]
    print(f"Resuming {d}")
else:
    d = os.path.join(args[args.index("--log_dir") + 1], args[args.index("--prefix") + 1] + "_run")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "config.json"), "w").write("{}")
    print(f"Run folder: {d}")
json.dump({"A": [1.0] * int(os.environ.get("TASKS", "10"))}, open(os.path.join(d, "metrics.json"), "w"))
if os.environ.get("STUB_STOP") and re.search(os.environ["STUB_STOP"], d):
    sys.exit(130)
print(f"Done: A_last 1.00; results in {d}")
'''


@pytest.fixture
def stub(tmp_path):
    exe = tmp_path / "python"
    exe.write_text(STUB.replace("PYTHON", sys.executable))
    exe.chmod(0o755)
    return exe


def run_sh(stub: Path, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """bash run.sh ARGS with the stand-in; returns the main.py calls it made this time."""
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    base = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "CALLS": str(calls), "LOG_DIR": str(tmp_path / "logs"),
            "SEEDS": "1993", "PROGRESS_EVERY": "600", "JOBS": "2"}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), *args], env=dict(base, **env), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [c for c in calls.read_text().splitlines() if c and not c.startswith("--report")]


def test_a_finished_row_is_not_run_again_and_a_stopped_one_resumes(stub, tmp_path):
    only = {"ONLY": "^(sdlora|gumbel)_1993$"}
    first = run_sh(stub, tmp_path, "quick", STUB_STOP="gumbel", **only)
    assert len(first) == 2 and all("--resume" not in c for c in first)
    second = run_sh(stub, tmp_path, "quick", **only)  # sdlora said Done: skipped; gumbel stopped: resumed
    assert second == [f"--resume {tmp_path}/logs/quick_gumbel_run"]
    gumbel_out = (tmp_path / "logs" / "gumbel_1993.out").read_text()
    assert "Run folder:" in gumbel_out and "Resuming" in gumbel_out  # the resumed run's lines were appended
    assert run_sh(stub, tmp_path, "quick", **only) == []  # both finished now
    assert len(run_sh(stub, tmp_path, "quick", RERUN="1", **only)) == 2  # RERUN=1 starts them afresh


def test_the_need_batch_forks_each_row_from_its_parent_at_the_first_shift(stub, tmp_path):
    calls = run_sh(stub, tmp_path, "need", STREAMS="plain shifted", KINDS="grey_invert", PLACEMENTS="3,4,8",
                   NEEDS="", FITS="0.8", NOVELTIES="0.05", SHARES="5", EVENS="2 3")
    logs = tmp_path / "logs"
    by_prefix = {c.split("--prefix ")[1].split()[0]: c for c in calls}
    p = "quick_unnormalised"
    assert sorted(by_prefix) == sorted([f"{p}_{s}_{r}" for s in ("plain", "grey_invert_348")
                                        for r in ("sdlora", "gumbel", "fit0.8", "novelty0.05",
                                                  "novelty0.05_share5", "novelty0.05_nearest",
                                                  "novelty0.05_share5_nearest", "even2", "even3")]
                                       + [f"{p}_grey_invert_348_oracle"])
    for row in ("sdlora", "gumbel"):  # plain rows without a parent run from scratch
        assert "--fork_from" not in by_prefix[f"{p}_plain_{row}"]
    for row in ("fit0.8", "novelty0.05", "novelty0.05_share5_nearest", "even2", "even3"):  # the rest: SD-LoRA's task 0
        assert f"--fork_from {logs}/{p}_plain_sdlora_run --fork_task 1 " in by_prefix[f"{p}_plain_{row}"]
    for row in ("sdlora", "gumbel", "fit0.8", "novelty0.05_share5", "novelty0.05_share5_nearest", "even2"):
        c = by_prefix[f"{p}_grey_invert_348_{row}"]  # a shifted row: its plain row
        assert f"--fork_from {logs}/{p}_plain_{row}_run --fork_task 3 " in c and "--shift_tasks [3,4,8]" in c
    assert "--novelty_reference nearest" in by_prefix[f"{p}_grey_invert_348_novelty0.05_share5_nearest"]
    oracle = by_prefix[f"{p}_grey_invert_348_oracle"]
    assert f"--fork_from {logs}/{p}_plain_even2_run --fork_task 3 " in oracle
    assert '--growth_schedule [0,3,4,8]' in oracle


def test_nearest_reopen_rows_reopen_the_nearest_and_fork_the_nearest_rows_before_task_5(stub, tmp_path):
    calls = run_sh(stub, tmp_path, "need", STREAMS="plain shifted", KINDS="grey_invert", PLACEMENTS="3,4,8 6,7,8",
                   NEEDS="", FITS="", NOVELTIES="0.05", SHARES="5", REFS="nearest nearest_reopen", EVENS="")
    logs, p = tmp_path / "logs", "quick_unnormalised"
    by_prefix = {c.split("--prefix ")[1].split()[0]: c for c in calls}
    for s in ("plain", "grey_invert_348", "grey_invert_678"):
        c = by_prefix[f"{p}_{s}_novelty0.05_share5_nearest_reopen"]
        assert "--novelty_reference nearest --novelty_reopen nearest" in c
    plain = by_prefix[f"{p}_plain_novelty0.05_share5_nearest_reopen"]
    assert f"--fork_from {logs}/{p}_plain_sdlora_run --fork_task 1 " in plain
    # first shift at 3: only adapter 0 existed before it, so the plain "nearest" row is the same prefix
    early = by_prefix[f"{p}_grey_invert_348_novelty0.05_share5_nearest_reopen"]
    assert f"--fork_from {logs}/{p}_plain_novelty0.05_share5_nearest_run --fork_task 3 " in early
    late = by_prefix[f"{p}_grey_invert_678_novelty0.05_share5_nearest_reopen"]  # at 6: its own plain row
    assert f"--fork_from {logs}/{p}_plain_novelty0.05_share5_nearest_reopen_run --fork_task 6 " in late


def test_a_row_whose_parent_failed_is_skipped_with_a_reason(stub, tmp_path):
    calls = run_sh(stub, tmp_path, "need", STREAMS="plain shifted", KINDS="grey_invert", PLACEMENTS="3,4,8",
                   NEEDS="", FITS="", NOVELTIES="", EVENS="2", ONLY="plain_sdlora|grey_invert_348_sdlora", TASKS="2")
    # the plain SD-LoRA run finished only 2 tasks: the shifted row cannot fork at task 3, and is not started
    assert [c for c in calls if "grey_invert" in c] == []
    out = (tmp_path / "logs").glob("*.out")
    assert any("plain_sdlora" in f.name for f in out)
