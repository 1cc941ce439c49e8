"""The statistics-heads comparison table (docs/heads.md): rows of runs or of replayed heads, mean ± std over seeds.

    python benchmarks/heads_table.py --row "LABEL=runs:GLOB" --row "LABEL=replay:GLOB:VARIANT" ...

``runs:GLOB`` takes run folders (their metrics.json: the head in force); ``replay:GLOB:VARIANT`` takes
benchmarks/heads.py --json files and one of their variants (the costs and adapters from the replayed run's
metrics.json; the stored numbers are the run's adapters plus the head's statistics; the seconds are the run's
training alone, without the head's). Each row: A_last and A_avg as mean ± std over the seeds found, forgetting,
adapters, stored numbers, train seconds (10 tasks; with the head's own where it ran in the run), seeds. A run that
has not finished every task it planned is left out (named on stderr).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np


def _from_run(run: Path, values: dict | None = None) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    seed = json.loads((run / "config.json").read_text())["seed"]
    v = values or m
    stored = m["adapter_params"][-1] + ((v.get("head_stored_numbers") or 0) if values else
                                        (m.get("head_stored_numbers") or [0])[-1])
    return {"seed": seed, "A_last": v["A_last"], "A_avg": v["A_avg"], "forgetting": v["forgetting"],
            "adapters": m["active_adapters"][-1], "stored": stored,
            "train_s": sum(m["train_seconds"]) + sum(m.get("head_seconds", []))}


def _finished(run: Path) -> bool:
    """The run trained every task it planned (utils/report.py counts them); one still running or stopped is left out,
    on stderr, so a table never averages a part of a run."""
    from utils.report import Run
    m, c = (json.loads((run / f).read_text()) for f in ("metrics.json", "config.json"))
    done = Run(run, c, m).finished
    if not done:
        print(f"left out, not finished ({len(m['A'])} tasks done): {run}", file=sys.stderr)
    return done


def gather(spec: str) -> list[dict]:
    kind, _, rest = spec.partition(":")
    if kind == "runs":
        return [_from_run(Path(p)) for p in sorted(glob.glob(rest))
                if (Path(p) / "metrics.json").is_file() and _finished(Path(p))]
    pattern, _, variant = rest.rpartition(":")
    out = []
    for f in sorted(glob.glob(pattern)):
        rep = json.loads(Path(f).read_text())
        out.append(_from_run(Path(rep["run_dir"]), rep["variants"][variant]))
    return out


def _ms(xs: list[float]) -> str:
    return f"{np.mean(xs):.2f} ± {np.std(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, help="LABEL=runs:GLOB or LABEL=replay:GLOB:VARIANT")
    args = ap.parse_args(argv)
    print("| row | A_last | A_avg | forgetting | adapters | stored numbers | train s (10 tasks) | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.row:
        label, _, src = spec.partition("=")
        rows = gather(src)
        if not rows:
            print(f"| {label} | not run | | | | | | |")
            continue
        col = lambda k: [r[k] for r in rows]  # noqa: E731
        print(f"| {label} | {_ms(col('A_last'))} | {_ms(col('A_avg'))} | {np.mean(col('forgetting')):.2f} | "
              f"{np.mean(col('adapters')):g} | {int(np.mean(col('stored'))):,} | {np.mean(col('train_s')):,.0f} | "
              f"{', '.join(str(s) for s in col('seed'))} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
