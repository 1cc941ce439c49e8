"""benchmarks/need_table.py: runs matched to their same-count schedule and oracle, and the bar's checks."""
import json
from pathlib import Path

from benchmarks.need_table import grew_at, load_rows, main, verdict


def fake_run(log_dir: Path, name: str, a_last: float, a_avg: float, active: list[int], steps: int = 75) -> None:
    d = log_dir / f"{name}_folder"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"A": [50.0] * 10, "A_last": a_last, "A_avg": a_avg,
                                                "active_adapters": active, "train_steps": [steps] * 10}))
    (log_dir / f"{name}.out").write_text(f"... Run folder: {d}\nDone: ...\n")


def stream(log_dir, stream, seed, rule_active, rule=(40.0, 50.0), even=(39.0, 49.0), oracle=(40.2, 50.2)):
    p = f"quick_unnormalised_{stream}"
    fake_run(log_dir, f"{p}_sdlora_{seed}", 38.0, 48.0, list(range(1, 11)))
    fake_run(log_dir, f"{p}_fit0.8_{seed}", *rule, rule_active, steps=80)
    n = rule_active[-1]
    fake_run(log_dir, f"{p}_even{n}_{seed}", *even, [1] * 10)  # the counts of a schedule are not read here
    if stream != "plain":
        fake_run(log_dir, f"{p}_oracle_{seed}", *oracle, [1] * 10)


def test_grew_at_is_where_the_active_count_rises():
    assert grew_at({"active_adapters": [1, 1, 2, 2, 3]}) == [0, 2, 4]


def test_a_rule_is_matched_with_its_own_count_and_judged(tmp_path):
    # grows at 0, 3 (shifted), 8 (shifted) and 5 (not): 2 of 3 shifted, 1 of 6 others
    active = [1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    stream(tmp_path, "grey_invert_348", 1993, active)
    stream(tmp_path, "plain", 1993, [1, 2, 2, 2, 2, 2, 2, 2, 2, 2], rule=(30.0, 40.0), even=(30.6, 39.0))
    (tmp_path / "quick_unnormalised_plain_even9_1993.out").write_text("no run folder\n")  # left out
    rows = load_rows(tmp_path, "quick_unnormalised")
    assert len(rows) == 7
    fit = next(r for r in rows if r.row == "fit0.8" and r.kind == "grey_invert")
    assert fit.grew == [0, 3, 5, 8] and fit.shifted == (3, 4, 8) and abs(fit.steps_ratio - 80 / 75) < 1e-12
    v = verdict(rows, "grey_invert", "fit0.8")
    assert v.matched == 1 and abs(v.vs_even_last - 1.0) < 1e-9 and abs(v.vs_oracle_last + 0.2) < 1e-9
    assert abs(v.shifted_grown - 2 / 3) < 1e-9 and abs(v.others_grown - 1 / 6) < 1e-9
    assert all(v.checks().values())
    p = verdict(rows, "plain", "fit0.8")
    assert abs(p.vs_even_last + 0.6) < 1e-9 and not p.checks()["A_last within 0.5 of the same-count schedule, or above"]
    assert main([str(tmp_path), "--out", str(tmp_path / "t.md")]) == 0
    assert "| grey_invert_348 | 1993 | fit0.8 | 40.00 | 50.00 | 4 | 0, 3, 5, 8 | 1.07 |" in \
        (tmp_path / "t.md").read_text()


def test_a_rule_that_grows_at_the_wrong_tasks_fails_the_placement_checks(tmp_path):
    stream(tmp_path, "patch_shuffle_257", 1994, [1, 2, 2, 3, 3, 3, 4, 4, 4, 4], oracle=(41.0, 50.0))
    v = verdict(load_rows(tmp_path, "quick_unnormalised"), "patch_shuffle", "fit0.8")
    c = v.checks()  # grew at 1, 3, 6: no shifted task; 3 of the 7 others; 1.0 under the oracle
    assert not c["grows at >= 2 of 3 shifted tasks"] and not c["grows at <= 1 in 3 of the others"]
    assert not c["A_last within 0.5 of the oracle"] and c["beats the same-count schedule on A_last"]


def test_recorded_rows_join_the_runs_and_a_run_at_hand_replaces_its_row(tmp_path):
    from benchmarks.need_table import load_recorded, merged
    stream(tmp_path, "grey_invert_348", 1993, [1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    fake_run(tmp_path, "quick_unnormalised_grey_invert_348_novelty0.045_share5_nearest_1993", 41.0, 51.0,
             [1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    csv = tmp_path / "rec.csv"
    csv.write_text("# measured before\nstream,row,seed,a_last,a_avg,grew,steps_ratio\n"
                   "grey_invert_348,even5,1993,1.0,2.0,0 2 4 6 8,1.0\n"  # no run at hand: joins
                   "grey_invert_348,oracle,1993,9.0,9.0,0 3 4 8,\n")  # a run at hand: it wins
    rows = merged(load_rows(tmp_path, "quick_unnormalised"), load_recorded(csv))
    by = {r.row: r for r in rows}
    assert by["even5"].a_last == 1.0 and by["even5"].grew == [0, 2, 4, 6, 8] and by["even5"].shifted == (3, 4, 8)
    assert by["oracle"].a_last == 40.2 and len([r for r in rows if r.row == "oracle"]) == 1
    v = verdict(rows, "grey_invert", "novelty0.045_share5_nearest")  # 3 adapters: matched with even3
    assert v.matched == 1 and abs(v.vs_even_last - 2.0) < 1e-9 and abs(v.vs_oracle_last - 0.8) < 1e-9


def test_a_rule_equal_to_its_schedule_passes_and_steps_come_from_any_stream_of_the_seed(tmp_path):
    fake_run(tmp_path, "quick_unnormalised_plain_sdlora_1993", 30.0, 40.0, list(range(1, 11)))
    fake_run(tmp_path, "quick_unnormalised_grey_invert_348_fit0.8_1993", 30.0, 40.0, [1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    fake_run(tmp_path, "quick_unnormalised_grey_invert_348_even3_1993", 30.0, 40.0, [1, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    fake_run(tmp_path, "quick_unnormalised_plain_fit0.8_1993", 30.0, 40.0, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    fake_run(tmp_path, "quick_unnormalised_plain_even2_1993", 30.0, 40.0, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    rows = load_rows(tmp_path, "quick_unnormalised")
    assert all(r.steps_ratio == 1.0 for r in rows)  # the grey rows have no SD-LoRA of their own
    p = verdict(rows, "plain", "fit0.8")
    assert p.vs_even_last == 0.0 and all(p.checks().values())  # equal to its schedule: on the curve
    g = verdict(rows, "grey_invert", "fit0.8").checks()
    assert g["grows at <= 1 in 3 of the others"] and not g["beats the same-count schedule on A_last"]
