"""The benchmark scripts run (tiny settings) and print what they promise."""
import pytest
import torch

from benchmarks import adapters, epoch, inflora_inputs


def test_adapter_benchmark_prints_every_variant_and_target(capsys):
    adapters.main(["--img-size", "32", "--batch", "2", "--tasks", "1", "3", "--rank", "2",
                   "--warmup", "0", "--repeats", "1"])
    out = capsys.readouterr().out
    for v in adapters.VARIANTS:
        assert f" {v} " in out
    for target in ("train step / plain", "eval batch / plain", "peak memory", "loop / framework"):
        assert target in out


def test_epoch_benchmark_reports_throughput(capsys, tmp_path):
    epoch.main(["--config", "exps/demo.json", "--task", "1", "--max_steps", "2", "--train_per_class", "8",
                "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip() for line in out.splitlines() if "img/s" in line}
    assert lines == {"plain", "compute", "loader", "device", "loader data", "device data"}
    assert out.count("end to end / compute") == 2 and out.count("of the compute time") == 2


def test_rms_through_is_the_root_mean_square_of_A_x():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7)  # uneven spectrum
    A = torch.randn(3, 6, generator=g, dtype=torch.float64)
    brute = (x @ A.T).pow(2).sum(1).mean().sqrt()
    assert abs(inflora_inputs.rms_through(A, x.T @ x / len(x)) - float(brute)) < 1e-10


def test_inflora_inputs_prints_a_row_per_block(capsys):
    inflora_inputs.main(["--config", "exps/demo.json", "--model_name", "inflora", "--images", "8",
                         "--train_per_class", "8"])
    rows = [r for r in (line.split() for line in capsys.readouterr().out.splitlines())
            if len(r) == 7 and r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]  # demo.json's depth
    for r in rows:
        top, top2, dims, inf, lora, ratio = map(float, r[1:])
        # printed to 2 and 1 decimals
        assert 0 < top <= top2 <= 1 and dims >= 1 and abs(inf / lora - ratio) < 0.05 + 0.005 * (1 + inf / lora) / lora


def test_protocol_benchmark_prints_a_row_per_protocol_with_its_ratio(capsys, tmp_path):
    import json
    from benchmarks import protocols
    files = []
    for name, size in (("big", 32), ("small", 16)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"description": name, "keys": {"img_size": size, "train_per_class": 8}}))
        files.append(str(p))
    protocols.main(["--config", "exps/demo.json", "--protocols", *files, "--task", "1", "--rounds", "1",
                    "--log_dir", str(tmp_path)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert [r[1] for r in rows] == ["32", "16"] and rows[0][-1] == "1.000"
    assert int(rows[0][2]) > int(rows[1][2])  # tokens per image fall with the image size


def test_kendall_tau_against_brute_force_and_swaps():
    import itertools
    from benchmarks.protocol_check import kendall_tau, swapped_pairs
    a, b = [5.0, 3.0, 4.0, 1.0, 2.0], [4.0, 3.5, 5.0, 1.0, 0.5]
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    s = sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in itertools.combinations(range(5), 2))
    assert abs(kendall_tau(a, b) - s / 10) < 1e-12  # no ties: tau-b = tau-a
    assert kendall_tau(a, a) == 1.0 and kendall_tau(a, [-v for v in a]) == -1.0
    assert swapped_pairs(list("abcde"), a, b) == [("a", "c", 1.0), ("d", "e", 1.0)]


def test_protocol_check_reads_runs_and_given_numbers(tmp_path, capsys):
    import json
    from benchmarks import protocol_check
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"prefix": "quick_b", "seed": 1}))
    (run / "metrics.json").write_text(json.dumps({"A_last": 20.0, "A_avg": 30.0, "A": [1, 2]}))
    short = tmp_path / "s"  # a run still going: left out, and said so
    short.mkdir()
    (short / "config.json").write_text(json.dumps({"prefix": "quick_c", "seed": 1}))
    (short / "metrics.json").write_text(json.dumps({"A_last": 99.0, "A_avg": 99.0, "A": [1]}))
    code = protocol_check.main(["--runs", str(run), str(short), "--given", "a,offline,1,50,60", "a,quick,1,30,40",
                                "b,offline,1,45,55", "c,offline,1,40,50"])
    out = capsys.readouterr().out
    assert code == 0 and "| b | 45.00 / 55.00 | 20.00 / 30.00 | 2 | 2 |" in out and "tau (A_last) 1.000" in out
    assert "left out: c on quick, seed 1: 1 of 2 tasks" in out and "| c |" not in out


def test_vit_port_check_prints_a_row_per_variant(capsys, tmp_path):
    from benchmarks import vit_port_check
    vit_port_check.main(["--config", "exps/demo.json", "--variants", "timm", "no_layerscale", "--train_per_class", "8",
                         "--log_dir", str(tmp_path)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["timm"],
                                                                                             ["no_layerscale"])]
    assert [r[0] for r in rows] == ["timm", "no_layerscale"]
    assert rows[0][1:] == rows[1][1:]  # vit_tiny has no LayerScale: the variant changes nothing


@pytest.mark.parametrize("script, args", [
    ("heads", ["/nonexistent/run"]), ("need_probe", ["/nonexistent/run"]), ("epoch", ["--config", "/no.json"]),
    ("inflora_inputs", ["--config", "/no.json"]), ("vit_port_check", ["--config", "/no.json"]),
    ("novelty_decisions", ["--config", "/no.json", "--seeds", "1"]),
    ("heads_cost", ["--config", "/no.json"]), ("adapters", ["--model", "no_such_vit"]),
])
def test_a_benchmark_given_bad_input_says_so_in_one_line(script, args, monkeypatch, capsys):
    """benchmarks/cli.py: exit 2 and one error line naming the file, as main.py, never a traceback."""
    import importlib
    import sys
    from benchmarks.cli import run
    module = importlib.import_module(f"benchmarks.{script}")
    monkeypatch.setattr(sys, "argv", [script, *args])
    assert run(module.main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ("no" in err[0] or "unknown" in err[0])


def test_ridge_rules_task_rule_replays_the_ridge_head_and_the_cli_prints_every_rule(tmp_path, capsys):
    """The dual-form replay of RanPAC's own rule gives the ridge head's accuracy after every task (here with fewer
    images than M, so the head's solve runs on a singular G)."""
    import json

    from safetensors.torch import save_file

    from benchmarks import ridge_rules
    from models.heads import RidgeHead

    class Cfg:
        ranpac_dim = 96

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 12, generator=g)
    y_tr, y_te = torch.arange(8).repeat_interleave(10), torch.arange(8).repeat_interleave(5)
    F = {"first.train": torch.randn(80, 12, generator=g) + centres[y_tr], "first.y_train": y_tr,
         "first.test": torch.randn(40, 12, generator=g) + centres[y_te], "first.y_test": y_te,
         "sizes": torch.tensor([2, 2, 2, 2])}
    head, expected = RidgeHead(12, 7, torch.device("cpu"), Cfg), []
    for t in range(4):
        sel = (y_tr >= 2 * t) & (y_tr < 2 * t + 2)
        head.observe(t, F["first.train"][sel], y_tr[sel], range(2 * t, 2 * t + 2))
        seen = y_te < 2 * t + 2
        expected.append(float((head.logits(F["first.test"][seen]).argmax(1) == y_te[seen]).double().mean() * 100))
    acc = ridge_rules.replay(F, "first", [2, 2, 2, 2], 7, 96, ["task", "seen", "fixed:1e3"])
    assert acc["task"] == pytest.approx(expected)
    save_file(F, str(tmp_path / "head_features.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"seed": 7}))
    ridge_rules.main([str(tmp_path), "--ranpac_dim", "96", "--rules", "task", "max_first", "fixed:10"])
    out = capsys.readouterr().out
    assert all(f"\n{r} | " in out for r in ("task", "max_first", "fixed:10"))
    with pytest.raises(SystemExit, match="unknown rule"):
        ridge_rules.main([str(tmp_path), "--rules", "oracle"])
