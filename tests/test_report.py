"""--report: figures are real PNGs, tables carry metrics.json's numbers, broken folders get clear errors."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from main import main
from utils.report import ReportError, load_run, report

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(cfg: dict, tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    before = set(Path(cfg["log_dir"]).glob("*")) if Path(cfg["log_dir"]).exists() else set()
    assert main([f"--config={p}"]) == 0
    (new,) = set(Path(cfg["log_dir"]).glob("*")) - before
    return new


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import TINY
    tmp = tmp_path_factory.mktemp("report")
    base = dict(TINY, log_dir=str(tmp / "logs"), epochs=3)
    probe = {k: v for k, v in base.items() if k != "lora_rank"}
    return {
        "sdlora_7": make_run(base, tmp, "a"),
        "sdlora_8": make_run(dict(base, seed=8), tmp, "b"),
        "gumbel": make_run(dict(base, model_name="gumbel_sdlora", gate_scope="new", warmup_fraction=0.2,
                                phase1_fraction=0.2, epochs=5, gate_lr=5.0, growth_cost=0.05), tmp, "c"),
        "probe": make_run(dict(probe, model_name="linear_probe"), tmp, "d"),
        "drift": make_run(dict(base, skip_mode="reuse", drift_threshold=1e-9), tmp, "e"),  # grows every task
    }


def test_report_on_every_kind_of_run_and_a_mix(runs, tmp_path):
    text = report(list(runs.values()), tmp_path / "out")
    for key, rd in runs.items():
        plots = rd / "plots"
        want = {"accuracy_matrix.png", "accuracy_curve.png"} | ({"adapters.png"} if key != "probe" else set()) | (
            {"growth_signal.png"} if key in ("gumbel", "drift") else set())  # a rule's need signal per task
        assert {p.name for p in plots.iterdir()} == want
        for p in plots.iterdir():
            assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    out = tmp_path / "out"
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    assert {p.name for p in out.iterdir()} == {"comparison.png", "tradeoff.png", "runs.md", "summary.md",
                                               "summary.csv"}
    assert (out / "tradeoff.png").stat().st_size > 5000
    assert "Mean ± std over seeds" in text


def test_tables_carry_the_numbers_of_metrics_json(runs, tmp_path):
    report([runs["sdlora_7"], runs["sdlora_8"], runs["gumbel"]], tmp_path / "out")
    rows = [r for r in (tmp_path / "out" / "runs.md").read_text().splitlines()[2:]]
    for line, key in zip(rows, ["sdlora_7", "sdlora_8", "gumbel"]):
        m = json.loads((runs[key] / "metrics.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:6] == [f"{m['A_last']:.2f}", f"{m['A_avg']:.2f}", f"{m['forgetting']:.2f}"]
        assert cells[6] == f"{m['active_adapters'][-1]}/{len(m['A'])}"
        assert cells[7] == f"{m['adapter_params'][-1]:,}"
    a, b = (json.loads((runs[k] / "metrics.json").read_text())["A_last"] for k in ("sdlora_7", "sdlora_8"))
    csv_rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    sd = next(r for r in csv_rows if r.startswith("sdlora,")).split(",")
    assert sd[1] == "7 8" and sd[2] == "2"
    assert float(sd[3]) == pytest.approx((a + b) / 2, abs=1e-4)
    assert float(sd[4]) == pytest.approx(abs(a - b) / 2 ** 0.5, abs=1e-4)  # sample std of two values


def test_broken_run_folders_get_clear_errors(runs, tmp_path, capsys):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "nope")
    half = tmp_path / "half"
    shutil.copytree(runs["gumbel"], half)
    (half / "beta_values_task_1.pt").unlink()
    with pytest.raises(ReportError, match=r"half: no beta_values_task_1.pt"):
        load_run(half)
    (half / "metrics.json").write_text('{"A": [1.0')
    with pytest.raises(ReportError, match=r"half: metrics.json is not valid JSON"):
        load_run(half)
    (half / "metrics.json").unlink()
    assert main(["--report", str(runs["sdlora_7"]), str(half)]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert not (runs["sdlora_7"].parent / "report").exists()  # nothing written when one folder is bad


def test_summary_measures_compute_against_sdlora_on_the_same_stream(runs, tmp_path):
    report([runs["sdlora_7"], runs["sdlora_8"], runs["drift"]], tmp_path / "out")
    header, *lines = csv.reader((tmp_path / "out" / "summary.csv").read_text().splitlines())
    rows = {r[0]: r for r in lines}
    col = header.index("relative_steps_mean")
    sd = next(v for v in rows.values() if v[1] == "7 8")
    drift = next(v for v in rows.values() if v[1] == "7" and "drift_threshold=1e-09" in v[0])
    # 3 tasks x 3 epochs x 2 steps; growing after a reuse trial pays one more epoch on tasks 1 and 2
    assert float(sd[col]) == pytest.approx(1.0)
    assert float(drift[col]) == pytest.approx(22 / 18, abs=1e-4)
    m = json.loads((runs["drift"] / "metrics.json").read_text())
    assert m["train_steps"] == [6, 8, 8] and m["active_adapters"] == [1, 2, 3]
    assert float(drift[header.index("active_adapters_mean")]) == 3.0


def test_labels_list_the_differing_keys_in_config_order_not_alphabetically():
    from utils.report import Run, label_runs
    base = {"model_name": "sdlora", "seed": 1, "protocol": "quick.json", "img_size": 70, "skip_mode": "none",
            "growth_schedule": None}
    a = Run(Path("a"), dict(base), {})
    b = Run(Path("b"), dict(base, protocol="offline.json", img_size=112, skip_mode="reuse", growth_schedule=[0]), {})
    label_runs([a, b])
    assert b.label == 'sdlora (protocol="offline.json", img_size=112, skip_mode="reuse", ...)'


def test_a_key_only_one_run_sets_names_it_before_keys_in_config_order():
    from utils.report import Run, label_runs
    base = {"model_name": "sdlora", "seed": 1, "lrate": 0.01, "growth_schedule": None, "skip_mode": "none",
            "novelty_threshold": None, "head": None}
    runs = [Run(Path("sd"), dict(base), {}),
            Run(Path("even"), dict(base, growth_schedule=[0, 5], skip_mode="reuse"), {}),
            Run(Path("nov"), dict(base, skip_mode="reuse", novelty_threshold=0.05), {}),
            Run(Path("best"), dict(base, growth_schedule=[0, 5], skip_mode="reuse", novelty_threshold=0.05,
                                   head="ridge"), {})]
    label_runs(runs)
    assert runs[3].label.startswith('sdlora (head="ridge"')  # the others differ from each other in the first keys
    assert len({r.label for r in runs}) == 4


# ---- tasks counted: stopped runs and repeated seeds are not averaged as seeds (issue 40) ----------------------
def _copy_cut(run: Path, dst: Path, n: int, planned: bool = True) -> Path:
    """A copy of a run folder as if it had stopped after n tasks (metrics.json cut); planned False: as a run made
    before metrics.json recorded tasks_planned."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("plots"))
    m = json.loads((dst / "metrics.json").read_text())
    m.update({k: v[:n] for k, v in m.items() if isinstance(v, list)})
    if not planned:
        m.pop("tasks_planned", None)
    (dst / "metrics.json").write_text(json.dumps(m))
    return dst


def _summary(out: Path) -> dict:
    header, *rows = csv.reader((out / "summary.csv").read_text().splitlines())
    return {(r[1], r[header.index("tasks_done")]): dict(zip(header, r)) for r in rows}


@pytest.mark.parametrize("planned", [True, False], ids=["recorded", "from-config"])
def test_a_stopped_run_is_shown_as_such_and_left_out_of_the_mean(planned, runs, tmp_path):
    stopped = _copy_cut(runs["sdlora_8"], tmp_path / "stopped", 2, planned)
    text = report([runs["sdlora_7"], stopped], tmp_path / "out")
    assert json.loads((runs["sdlora_7"] / "metrics.json").read_text())["tasks_planned"] == 3
    rows = {r.split("|")[2].strip(): r for r in (tmp_path / "out" / "runs.md").read_text().splitlines()[2:]}
    assert rows["7"].split("|")[3].strip() == "3/3" and rows["8"].split("|")[3].strip() == "2/3 (stopped)"
    summary = _summary(tmp_path / "out")
    assert list(summary) == [("7", "3")] and summary[("7", "3")]["tasks_planned"] == "3"
    assert f"{stopped}: 2/3 tasks, stopped before the end (--include_unfinished" in text
    assert "| sdlora | 7 | 3/3 |" in (tmp_path / "out" / "summary.md").read_text()
    # asked for: in, but only beside runs with as many tasks (its own row here)
    report([runs["sdlora_7"], stopped], tmp_path / "out2", include_unfinished=True)
    assert sorted(_summary(tmp_path / "out2")) == [("7", "3"), ("8", "2")]


def test_the_issue_case_a_stopped_repeat_of_a_seed_is_not_a_second_seed(runs, tmp_path, capsys):
    """A run stopped after 1 task and a finished run, same config and seed: no "mean ± std over seeds 7, 7"."""
    again = _copy_cut(runs["sdlora_7"], tmp_path / "again", 3)
    stopped = _copy_cut(runs["sdlora_7"], tmp_path / "stopped", 1)
    assert main(["--report", str(runs["sdlora_7"]), str(stopped), str(again), str(runs["sdlora_8"]),
                 "--report_out", str(tmp_path / "out"), "--include_unfinished"]) == 0
    out = capsys.readouterr().out
    summary = _summary(tmp_path / "out")
    assert set(summary) == {("7 8", "3"), ("7", "1")}  # the repeat left out, the stopped run in a row of its own
    assert f"{again}: seed 7 again (as {runs['sdlora_7']}): a repeat, not another seed" in out
    a, b = (json.loads((runs[k] / "metrics.json").read_text())["A_last"] for k in ("sdlora_7", "sdlora_8"))
    assert float(summary[("7 8", "3")]["A_last_mean"]) == pytest.approx((a + b) / 2, abs=1e-4)


def test_report_refuses_before_writing_anything(runs, tmp_path, capsys):
    clean = _copy_cut(runs["sdlora_7"], tmp_path / "clean", 3)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["--report", str(clean), str(runs["sdlora_8"]), "--report_out", str(afile / "out")]) == 2
    assert "--report_out" in capsys.readouterr().err and not (clean / "plots").exists()
    for damage, needle in [(lambda d: (d / "config.json").write_text("[]"), "config.json holds a JSON list"),
                           (lambda d: (d / "metrics.json").write_text(""), "metrics.json is empty"),
                           (lambda d: (d / "metrics.json").write_text('{"A": [1, 2], "accuracy_matrix": [[1]], '
                                                                     '"A_last": 2, "A_avg": 1, "forgetting": 0}'),
                            "'accuracy_matrix' is not 2 rows")]:
        bad = _copy_cut(runs["sdlora_7"], tmp_path / f"bad{len(needle)}", 3)
        damage(bad)
        assert main(["--report", str(clean), str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(bad) in err and err.count("\n") == 1
        assert not (clean / "plots").exists() and not (tmp_path / "report").exists()


def test_a_damaged_beta_record_is_named(runs, tmp_path):
    half = tmp_path / "g"
    shutil.copytree(runs["gumbel"], half, ignore=shutil.ignore_patterns("plots"))
    (half / "beta_values_task_0.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ReportError, match=r"g: beta_values_task_0.pt cannot be read"):
        load_run(half)


def test_task_axes_keep_a_tick_per_task_to_20_then_every_fifth():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.report import _task_ticks

    fig, ax = plt.subplots()
    for T, ticks in ((10, list(range(10))), (20, list(range(20))), (50, list(range(0, 50, 5)))):
        _task_ticks(ax, T)
        assert list(ax.get_xticks()) == ticks
    plt.close(fig)
