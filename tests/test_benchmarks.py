"""The benchmark scripts run (tiny settings) and print what they promise."""
from benchmarks import adapters, epoch


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
