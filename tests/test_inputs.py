"""Bad input at every entry point: exit 2 with one line naming the file or key and the fix, before any folder or
file is written, and nothing saved is changed. The sweep of issue 40 (docs/guarantees.md lists what each test
holds). Most refusals here come before any training; the runs they need are tiny and made once per module."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from main import main
from tests.conftest import ROOT, TINY


# ---- helpers ----------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with a hash of its bytes: what 'nothing saved is modified' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys, *needles: str) -> str:
    """main(argv) exits 2 with one error line (no traceback) holding every needle; returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A run that finished tasks 0..2 of its 4 (max_tasks 3): what the resume and fork refusals copy and damage."""
    tmp = tmp_path_factory.mktemp("inputs")
    cfg = dict(TINY, synthetic_classes=8, max_tasks=3, log_dir=str(tmp / "logs"))
    assert main([f"--config={write(tmp / 'base.json', cfg)}"]) == 0
    (run,) = (tmp / "logs").iterdir()
    assert len(json.loads((run / "metrics.json").read_text())["A"]) == 3
    return run


@pytest.fixture
def copy(base, tmp_path):
    """A fresh copy of the base run folder, to damage."""
    def make(name: str = "run") -> Path:
        return Path(shutil.copytree(base, tmp_path / name))
    return make


# ---- a new run: the config, the protocol, the weights, the data -----------------------------------------
@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), ("", "is empty"), ('{"epochs": 1', "is not valid JSON"), ("[1, 2]", "JSON object"),
    (b"\xff\xfe\x00", "cannot be read as text"), ("folder", "is a folder"),
], ids=["missing", "empty", "cut-short", "list", "binary", "folder"])
def test_a_bad_config_file_is_named(content, needle, tmp_path, capsys):
    p = tmp_path / "c.json"
    if content == "folder":
        p.mkdir()
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    refused([f"--config={p}"], capsys, "config file", str(p), needle)


def test_a_bad_protocol_file_is_named(tiny, tmp_path, capsys):
    cfg = write(tmp_path / "c.json", tiny)
    refused([f"--config={cfg}", "--protocol", str(tmp_path / "nope.json")], capsys, "protocol file", "does not exist",
            "shipped protocols")
    refused([f"--config={cfg}", "--protocol", str(write(tmp_path / "p.json", '{"keys": {'))], capsys,
            "protocol file", "is not valid JSON")
    assert not Path(tiny["log_dir"]).exists()


def weights(path: Path, **over) -> Path:
    """A random-init tiny ViT of the TINY architecture saved as a weights file."""
    import timm
    from safetensors.torch import save_file
    kw = dict(TINY["backbone_kwargs"], **over)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"), ("folder", "is a folder, not a weights file"),
    ("text.safetensors", "is not a readable safetensors file"), ("text.pth", "neither a safetensors file"),
    ("empty.pth", "is empty"), ("cut.safetensors", "is not a readable safetensors file"),
    ("other-arch.safetensors", "could not load weights"),
])
def test_bad_weights_stop_before_any_folder(kind, needle, tiny, tmp_path, capsys):
    p = tmp_path / kind
    if kind == "folder":
        p.mkdir()
    elif kind.startswith("text"):
        p.write_text("hello")
    elif kind == "empty.pth":
        p.write_bytes(b"")
    elif kind == "cut.safetensors":
        b = weights(tmp_path / "w.safetensors").read_bytes()
        p.write_bytes(b[:len(b) // 2])
    elif kind.startswith("other"):
        weights(p, embed_dim=64, num_heads=4)
    cfg = write(tmp_path / "c.json", dict(tiny, pretrained=True, pretrained_path=str(p)))
    line = refused([f"--config={cfg}"], capsys, needle, kind)
    assert "pretrained_path" in line or "could not load weights for 'vit_tiny_patch16_224'" in line
    assert not Path(tiny["log_dir"]).exists()  # no run folder, no log_dir


def test_an_unknown_backbone_bad_kwargs_or_a_repeated_seed_stop_before_any_folder(tiny, tmp_path, capsys):
    cfg = write(tmp_path / "c.json", tiny)
    refused([f"--config={cfg}", "--backbone_type", "vit_tiny_patch16_22"], capsys, "backbone_type",
            "unknown timm model 'vit_tiny_patch16_22'")
    refused([f"--config={cfg}", "--backbone_kwargs", '{"depht": 2}'], capsys, "backbone_kwargs")
    refused([f"--config={cfg}", "--backbone_kwargs", '{"depth": 0}'], capsys, "backbone_kwargs",
            "no transformer blocks")
    refused([f"--config={cfg}", "--seed", "[7, 8, 7]"], capsys, "config key 'seed'", "[7] more than once")
    assert not Path(tiny["log_dir"]).exists()


def npz_file(path: Path, classes: int = 4) -> Path:
    from utils.data.datasets import make_synthetic
    d = make_synthetic(classes, 16, 8, size=32, seed=0)
    np.savez(path, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    return path


@pytest.mark.parametrize("cut", ["empty", "half", "folder-of-two"])
def test_a_damaged_npz_is_named(cut, tiny, tmp_path, capsys):
    good = npz_file(tmp_path / "good.npz").read_bytes()
    p = tmp_path / "d.npz"
    if cut == "folder-of-two":
        p = tmp_path / "two"
        p.mkdir()
        npz_file(p / "a.npz"), npz_file(p / "b.npz")
    else:
        p.write_bytes(b"" if cut == "empty" else good[:len(good) // 2])
    cfg = write(tmp_path / "c.json", dict(tiny, dataset="cifar100", data_path=str(p)))
    refused([f"--config={cfg}"], capsys, str(p))
    assert not Path(tiny["log_dir"]).exists()


# ---- the command line -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--resume", "R", "--config", "c.json"], "--resume continues a run under its own config.json; it takes no "
                                              "--config"),
    (["--resume", "R", "--fork_from", "R", "--fork_task", "1"], "it takes no --fork_from, --fork_task"),
    (["--report", "R", "--config", "c.json"], "--report reads run folders only: it takes no --config"),
    (["--report", "R", "--include_unfinshed"], "it takes no --include_unfinshed"),
    (["--config", "c.json", "--report_out", "out"], "--report_out and --include_unfinished go with --report"),
    (["--config", "c.json", "--include_unfinished"], "go with --report"),
])
def test_flags_that_do_not_go_together_are_refused(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(argv, capsys, needle)
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_other_keys_and_names_the_way_to_change_them(base, capsys):
    before = snapshot(base)
    refused(["--resume", str(base), "--epochs", "3"], capsys, "--resume cannot change ['epochs']", "--fork_from")
    refused(["--resume", str(base), "--protocol", "exps/protocols/quick.json"], capsys, "it takes no --protocol")
    assert snapshot(base) == before


# ---- --resume: every file of a run folder ---------------------------------------------------------------
def _cut_metrics(run: Path, n: int) -> None:
    m = json.loads((run / "metrics.json").read_text())
    m.update({k: v[:n] for k, v in m.items() if isinstance(v, list)})
    write(run / "metrics.json", m)


DAMAGE = {  # name: (what to do to the copy, the words the refusal must hold)
    "config-missing": (lambda r: (r / "config.json").unlink(), ["not a run folder (no config.json)"]),
    "config-empty": (lambda r: write(r / "config.json", ""), ["config.json' is empty"]),
    "config-cut": (lambda r: write(r / "config.json", (r / "config.json").read_text()[:40]),
                   ["config.json' is not valid JSON", "restore it from a copy"]),
    "config-list": (lambda r: write(r / "config.json", "[]"), ["config.json' holds a JSON list"]),
    "config-bad-key": (lambda r: write(r / "config.json", dict(json.loads((r / "config.json").read_text()), lrat=1)),
                       ["config.json' no longer reads as a config", "unknown config key 'lrat'"]),
    "config-other-run": (lambda r: write(r / "config.json", dict(json.loads((r / "config.json").read_text()),
                                                                  lora_rank=3)),
                         ["do not fit its config.json"]),
    "metrics-missing": (lambda r: (r / "metrics.json").unlink(),
                        ["metrics.json is missing, but files of later tasks are there (task_1.safetensors",
                         "resuming would overwrite them"]),
    "metrics-empty": (lambda r: write(r / "metrics.json", ""), ["metrics.json' is empty"]),
    "metrics-cut": (lambda r: write(r / "metrics.json", (r / "metrics.json").read_text()[:100]),
                    ["metrics.json' is not valid JSON"]),
    "metrics-list": (lambda r: write(r / "metrics.json", "[1]"), ["metrics.json' holds a JSON list"]),
    "metrics-shape": (lambda r: write(r / "metrics.json", {"A": [1.0, 2.0], "accuracy_matrix": [[1.0]]}),
                      ["'accuracy_matrix' is not 2 rows"]),
    "metrics-fewer": (lambda r: _cut_metrics(r, 1),
                      ["metrics.json lists tasks 0..0 as done, but files of later tasks are there "
                       "(task_2.safetensors)"]),
    "checkpoint-missing": (lambda r: (r / "task_1.safetensors").unlink(),
                           ["task_1.safetensors is missing", "--fork_task 1"]),
    "checkpoint-empty": (lambda r: write(r / "task_0.safetensors", ""), ["task_0.safetensors' is corrupt"]),
    "checkpoint-cut": (lambda r: (r / "task_2.safetensors").write_bytes((r / "task_2.safetensors").read_bytes()[:-9]),
                       ["task_2.safetensors' is corrupt"]),
    "checkpoint-of-another-task": (lambda r: shutil.copy(r / "task_0.safetensors", r / "task_2.safetensors"),
                                   ["task_2.safetensors' holds task 0's tensors"]),
    "a-later-task-file": (lambda r: shutil.copy(r / "task_0.safetensors", r / "task_4.safetensors"),
                          ["metrics.json lists tasks 0..2 as done, but files of later tasks are there "
                           "(task_4.safetensors)"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_of_a_damaged_folder_is_refused_and_changes_nothing(damage, copy, capsys):
    run = copy()
    do, needles = DAMAGE[damage]
    do(run)
    before = snapshot(run)
    refused(["--resume", str(run), "--max_tasks", "4"], capsys, *needles)
    assert snapshot(run) == before  # nothing written, nothing overwritten: not even train.log


def test_resume_of_a_folder_that_takes_no_files_is_refused_before_any_training(copy, capsys, monkeypatch):
    import errno
    import tempfile

    import utils.run_folder as rf
    run = copy()
    before = snapshot(run)
    real = tempfile.TemporaryFile

    def read_only(*a, dir=None, **kw):  # a read-only mount (root ignores chmod, so it is simulated here)
        if dir is not None and Path(dir) == run:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(rf.tempfile, "TemporaryFile", read_only)
    refused(["--resume", str(run), "--max_tasks", "4"], capsys, f"run folder '{run}' is not writable",
            "Read-only file system", "copy the folder")
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_resume_of_a_read_only_folder_is_refused(copy, capsys):
    run = copy()
    before = snapshot(run)
    os.chmod(run, 0o555)
    try:
        refused(["--resume", str(run), "--max_tasks", "4"], capsys, "is not writable")
    finally:
        os.chmod(run, 0o755)
    assert snapshot(run) == before


def test_a_checkpoint_without_its_metrics_entry_is_retrained_and_nothing_else_is_touched(base, copy, capsys):
    """The one case where files disagree by design: stopped between task 2's checkpoint and metrics.json. Task 2
    is trained again (its checkpoint rewritten, the same numbers); tasks 0 and 1 keep their bytes."""
    run = copy()
    _cut_metrics(run, 2)
    before = snapshot(run)
    assert main(["--resume", str(run)]) == 0
    after = snapshot(run)
    assert all(after[f] == before[f] for f in ("task_0.safetensors", "task_1.safetensors", "config.json"))
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, base))
    assert got["A"] == want["A"] and got["accuracy_matrix"] == want["accuracy_matrix"]
    assert got["tasks_planned"] == 3


def test_a_finished_folder_resumes_to_nothing(base, copy, capsys):
    run = copy()
    assert main(["--resume", str(run)]) == 0
    assert "all 3 tasks are already done" in capsys.readouterr().out


# ---- paths: a run folder reads the same files from any directory ---------------------------------------
def test_a_run_folder_resolves_its_paths_and_resumes_from_any_directory(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    npz_file(tmp_path / "d.npz")
    weights(tmp_path / "w.safetensors")
    cfg = dict(tiny, dataset="cifar100", data_path="d.npz", pretrained=True, pretrained_path="w.safetensors",
               max_tasks=1, log_dir="logs")
    assert main([f"--config={write(tmp_path / 'c.json', cfg)}"]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    saved = json.loads((run / "config.json").read_text())
    assert saved["data_path"] == str(tmp_path / "d.npz") and saved["pretrained_path"] == str(tmp_path / "w.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--resume", str(run), "--max_tasks", "2"]) == 0
    assert len(json.loads((run / "metrics.json").read_text())["A"]) == 2
    # a folder from before paths were stored absolute: refused from elsewhere, naming the key and the fix
    write(run / "config.json", dict(saved, data_path="d.npz"))
    before = snapshot(run)
    refused(["--resume", str(run)], capsys, "names data_path 'd.npz' relative to the directory the run was started "
                                            "from", "run --resume from that directory")
    assert snapshot(run) == before and list(elsewhere.iterdir()) == []


# ---- --fork_from: the parent is only read, a refused fork leaves no folder -------------------------------
@pytest.mark.parametrize("damage, needles", [
    ("checkpoint-missing", ["cannot fork: the parent", "task_1.safetensors is missing"]),
    ("metrics-cut", ["metrics.json' is not valid JSON"]),
    ("config-cut", ["config.json' is not valid JSON"]),
    ("checkpoint-cut", ["task_2.safetensors' is corrupt"]),
])
def test_a_fork_of_a_damaged_parent_is_refused_naming_the_parents_file(damage, needles, copy, tmp_path, capsys):
    parent = copy("parent")
    DAMAGE[damage][0](parent)
    before = snapshot(parent)
    logs = tmp_path / "fork_logs"
    line = refused(["--fork_from", str(parent), "--fork_task", "3", "--log_dir", str(logs)], capsys, *needles)
    assert str(parent) in line
    assert snapshot(parent) == before and not logs.exists()


def test_a_fork_whose_copy_does_not_load_leaves_no_folder(copy, tmp_path, capsys, monkeypatch):
    """A refusal that only the restore finds (here: checkpoints that do not fit, made to fail) removes the new
    folder it was found in; the parent keeps its bytes."""
    from models.base import Learner
    from utils.io import CheckpointError
    parent = copy("parent")
    before = snapshot(parent)

    def no_fit(self, dm, done):
        raise CheckpointError(f"the checkpoints in {self.run_dir} do not fit its config.json (test)")

    monkeypatch.setattr(Learner, "restore", no_fit)
    logs = tmp_path / "fork_logs"
    refused(["--fork_from", str(parent), "--fork_task", "2", "--log_dir", str(logs)], capsys, "do not fit")
    assert snapshot(parent) == before and list(logs.iterdir()) == []


# ---- run.sh and the split tool ---------------------------------------------------------------------------
def test_run_sh_refuses_an_unknown_mode_before_any_folder(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "quikc"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, LOG_DIR=str(tmp_path / "logs"), PYTHON="false"), timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "unknown mode 'quikc'" in out.stderr and "quick" in out.stderr and not (tmp_path / "logs").exists()


def test_the_split_tool_refuses_bad_input_with_exit_2(tmp_path, capsys):
    from utils.data.prepare_split import main as split
    src = tmp_path / "raw"
    (src / "n00000001").mkdir(parents=True)
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (4, 4)).save(src / "n00000001" / f"{i}.png")
    afile = write(tmp_path / "afile", "x")
    cases = [
        (["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "d1")], "--src"),
        (["--src", str(afile), "--dst", str(tmp_path / "d2")], "--src"),
        (["--src", str(src), "--dst", str(afile)], "is a file"),
        (["--src", str(src), "--dst", str(tmp_path / "d3"), "--test_fraction", "1.5"], "--test_fraction 1.5"),
        (["--src", str(src), "--dst", str(afile / "d4")], "cannot be made"),
    ]
    for argv, needle in cases:
        assert split(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: prepare_split:") and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "raw"]
    dst = tmp_path / "split"
    assert split(["--src", str(src), "--dst", str(dst)]) == 0
    write(dst / "split.json", '{"seed": ')  # damaged record
    assert split(["--src", str(src), "--dst", str(dst)]) == 2
    assert "split.json' is damaged" in capsys.readouterr().err


def test_the_old_entry_points_exit_2_too(tmp_path):
    """python -m utils.data.prepare_split and main.py as a user types them (a fresh process: exit codes as the
    shell sees them)."""
    for argv in (["-m", "utils.data.prepare_split", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "d")],
                 [str(ROOT / "main.py"), "--config", str(tmp_path / "nope.json")]):
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr, out.stderr
