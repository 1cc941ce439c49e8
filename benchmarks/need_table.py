"""The growth-on-need table of ``bash run.sh need`` (docs/growth.md), and the bar a growth rule has to pass.

    python benchmarks/need_table.py LOG_DIR [--rules fit0.8 gumbel] [--protocol quick_unnormalised] [--out FILE]

Reads the run folders that LOG_DIR's console logs name (rows ``{protocol}_{stream}_{row}_{seed}``: streams
``plain`` and ``{shift_kind}_{placement}``; rows sdlora, gumbel, need*, fit*, even2-5, oracle) and prints:
1. every run: A_last, A_avg, adapters kept, the tasks that grew one, training steps over SD-LoRA's (same stream
   and seed);
2. per stream kind, each row's mean over placements and seeds, and each rule against the evenly spaced schedule
   with the rule's own adapter count (matched run by run) and against the oracle (grows at task 0 and the shifts);
3. the bar of the growth issue for each rule: on shifted streams it grows at >= 2 of 3 shifted tasks and at <= 1
   in 3 of the others, beats the same-count schedule on A_last and A_avg and is within 0.5 of the oracle (means);
   on the plain stream it is within 0.5 of the same-count schedule or above; <= 1.15x SD-LoRA's steps.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

NAME = re.compile(r"^(?P<proto>[a-z]+(?:_unnormalised)?)_(?P<stream>plain|(?P<kind>[a-z_]+?)_(?P<pl>\d+))_"
                  r"(?P<row>[a-z]+[\d.e-]*(?:_share\d+)?(?:_nearest(?:_reopen)?)?)_(?P<seed>\d+)$")
STREAM = re.compile(r"^(?:plain|(?P<kind>[a-z_]+?)_(?P<pl>\d+))$")


@dataclass
class Row:
    """One finished run of the table."""
    stream: str
    kind: str  # "plain" or the shift kind
    shifted: tuple[int, ...]
    row: str
    seed: int
    a_last: float
    a_avg: float
    grew: list[int]
    steps: int
    n_tasks: int
    steps_ratio: Optional[float] = field(default=None)

    @property
    def adapters(self) -> int:
        return len(self.grew)


def grew_at(metrics: dict) -> list[int]:
    """The tasks that got an adapter of their own: where the count of active adapters rose (task 0 always)."""
    active = metrics["active_adapters"]
    return [t for t in range(len(active)) if t == 0 or active[t] > active[t - 1]]


def run_folder(out: Path) -> Optional[Path]:
    m = re.search(r"Run folder: ([^,\n]*)", out.read_text(errors="replace"))
    return Path(m.group(1)) if m else None


def load_rows(log_dir: Path, protocol: str, root: Path = Path(".")) -> list[Row]:
    """Every finished run of the table under LOG_DIR (10 tasks recorded); the others are left out."""
    rows = []
    for out in sorted(log_dir.glob("*.out")):
        m = NAME.match(out.stem)
        if not m or m["proto"] != protocol:
            continue
        d = run_folder(out)
        if d is None:
            continue
        d = d if d.is_absolute() else root / d
        if not (d / "metrics.json").is_file():
            continue
        metrics = json.loads((d / "metrics.json").read_text())
        if "A_last" not in metrics or len(metrics["A"]) < 10:  # the table's streams have 10 tasks
            continue
        pl = tuple(int(c) for c in m["pl"]) if m["pl"] else ()
        rows.append(Row(m["stream"], m["kind"] or "plain", pl, m["row"], int(m["seed"]), metrics["A_last"],
                        metrics["A_avg"], grew_at(metrics), sum(metrics["train_steps"]), len(metrics["A"])))
    sd = {(r.stream, r.seed): r.steps for r in rows if r.row == "sdlora"}
    # SD-LoRA's steps do not depend on the stream (a shifted task has the same images): any stream's of the seed
    by_seed = {seed: steps for (_, seed), steps in sorted(sd.items())}
    for r in rows:
        steps = sd.get((r.stream, r.seed), by_seed.get(r.seed))
        if steps:
            r.steps_ratio = r.steps / steps
    return rows


def load_recorded(path: Path) -> list[Row]:
    """Rows measured before whose run folders are gone (CSV: stream,row,seed,a_last,a_avg,grew,steps_ratio;
    grew: the tasks that got an adapter, space-separated), each reproducible from its run.sh row."""
    import csv
    rows = []
    with path.open() as f:
        for rec in csv.DictReader(line for line in f if not line.startswith("#")):
            m = STREAM.match(rec["stream"])
            if m is None:
                raise ValueError(f"{path}: stream {rec['stream']!r} is neither plain nor KIND_PLACEMENT")
            ratio = float(rec["steps_ratio"]) if rec["steps_ratio"] else None
            rows.append(Row(rec["stream"], m["kind"] or "plain", tuple(int(c) for c in m["pl"] or ""), rec["row"],
                            int(rec["seed"]), float(rec["a_last"]), float(rec["a_avg"]),
                            [int(t) for t in rec["grew"].split()], 0, 10, ratio))
    return rows


def merged(runs: list[Row], recorded: list[Row]) -> list[Row]:
    """The runs at hand, and each recorded row that no run at hand repeats."""
    have = {(r.stream, r.row, r.seed) for r in runs}
    return runs + [r for r in recorded if (r.stream, r.row, r.seed) not in have]


def mean(xs: list[float]) -> Optional[float]:
    return statistics.fmean(xs) if xs else None


def fmt(x: Optional[float], sign: bool = False) -> str:
    return "" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def runs_table(rows: list[Row]) -> str:
    lines = ["| stream | seed | row | A_last | A_avg | adapters | grew at | steps / SD-LoRA's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.kind != "plain", r.stream, r.seed, r.row)):
        lines.append(f"| {r.stream} | {r.seed} | {r.row} | {r.a_last:.2f} | {r.a_avg:.2f} | {r.adapters} | "
                     f"{', '.join(map(str, r.grew))} | {fmt(r.steps_ratio)} |")
    return "\n".join(lines)


@dataclass
class Verdict:
    """A rule on one stream kind: its means, the matched comparisons, and the bar's checks."""
    kind: str
    rule: str
    runs: int
    a_last: float
    a_avg: float
    adapters: float
    steps: Optional[float]
    vs_even_last: Optional[float]  # rule - the same-count evenly spaced schedule, mean over matched runs
    vs_even_avg: Optional[float]
    vs_oracle_last: Optional[float]
    vs_oracle_avg: Optional[float]
    shifted_grown: Optional[float]  # share of the shifted tasks where it grew
    others_grown: Optional[float]  # share of the other tasks (1..n-1, not shifted) where it grew
    matched: int  # runs that had their same-count schedule

    def checks(self) -> dict[str, bool]:
        def at_least(x: Optional[float], bound: float) -> bool:  # an unmeasured comparison fails
            return x is not None and x >= bound - 1e-9

        c = {"steps <= 1.15x SD-LoRA's": self.steps is not None and self.steps <= 1.15}
        if self.kind == "plain":
            c["A_last within 0.5 of the same-count schedule, or above"] = at_least(self.vs_even_last, -0.5)
        else:
            c["grows at >= 2 of 3 shifted tasks"] = at_least(self.shifted_grown, 2 / 3)
            c["grows at <= 1 in 3 of the others"] = self.others_grown is not None and self.others_grown <= 1 / 3 + 1e-9
            c["beats the same-count schedule on A_last"] = self.vs_even_last is not None and self.vs_even_last > 0
            c["beats the same-count schedule on A_avg"] = self.vs_even_avg is not None and self.vs_even_avg > 0
            c["A_last within 0.5 of the oracle"] = at_least(self.vs_oracle_last, -0.5)
            c["A_avg within 0.5 of the oracle"] = at_least(self.vs_oracle_avg, -0.5)
        return c


def verdict(rows: list[Row], kind: str, rule: str) -> Optional[Verdict]:
    mine = [r for r in rows if r.kind == kind and r.row == rule]
    if not mine:
        return None
    by = {(r.stream, r.seed, r.row): r for r in rows if r.kind == kind}
    d_even_last, d_even_avg, d_or_last, d_or_avg, sh, ot = [], [], [], [], [], []
    for r in mine:
        even = by.get((r.stream, r.seed, f"even{r.adapters}"))
        if even is not None:
            d_even_last.append(r.a_last - even.a_last)
            d_even_avg.append(r.a_avg - even.a_avg)
        oracle = by.get((r.stream, r.seed, "oracle"))
        if oracle is not None:
            d_or_last.append(r.a_last - oracle.a_last)
            d_or_avg.append(r.a_avg - oracle.a_avg)
        if r.shifted:
            sh.append(sum(t in r.grew for t in r.shifted) / len(r.shifted))
        others = [t for t in range(1, r.n_tasks) if t not in r.shifted]
        ot.append(sum(t in r.grew for t in others) / len(others))
    ratios = [r.steps_ratio for r in mine if r.steps_ratio is not None]
    return Verdict(kind, rule, len(mine), mean([r.a_last for r in mine]), mean([r.a_avg for r in mine]),
                   mean([r.adapters for r in mine]), mean(ratios), mean(d_even_last), mean(d_even_avg),
                   mean(d_or_last), mean(d_or_avg), mean(sh), mean(ot), len(d_even_last))


def summary(rows: list[Row], rules: list[str]) -> str:
    out = []
    for kind in sorted({r.kind for r in rows}, key=lambda k: (k != "plain", k)):
        sub = [r for r in rows if r.kind == kind]
        out += [f"\n### {kind}: {len({(r.stream, r.seed) for r in sub})} stream-seed pairs "
                f"({', '.join(sorted({r.stream for r in sub}))}; seeds {sorted({r.seed for r in sub})})", "",
                "| row | runs | A_last | A_avg | adapters | steps / SD-LoRA's |", "|---|---|---|---|---|---|"]
        for name in sorted({r.row for r in sub}, key=row_order):
            rs = [r for r in sub if r.row == name]
            out.append(f"| {name} | {len(rs)} | {fmt(mean([r.a_last for r in rs]))} | "
                       f"{fmt(mean([r.a_avg for r in rs]))}"
                       f" | {mean([r.adapters for r in rs]):.1f} | "
                       f"{fmt(mean([r.steps_ratio for r in rs if r.steps_ratio is not None]))} |")
        for rule in rules:
            v = verdict(rows, kind, rule)
            if v is None:
                continue
            out += ["", f"**{rule}** on {kind} ({v.runs} runs, {v.matched} with their same-count schedule): "
                    f"A_last - schedule {fmt(v.vs_even_last, True)}, A_avg - schedule {fmt(v.vs_even_avg, True)}"
                    + (f", A_last - oracle {fmt(v.vs_oracle_last, True)}, A_avg - oracle {fmt(v.vs_oracle_avg, True)}"
                       f", grew at {100 * v.shifted_grown:.0f} % of the shifted tasks" if v.shifted_grown is not None
                       else "")
                    + f", at {100 * (v.others_grown or 0):.0f} % of the others; steps {fmt(v.steps)}x SD-LoRA's", ""]
            out += [f"- [{'x' if ok else ' '}] {name}" for name, ok in v.checks().items()]
    return "\n".join(out)


def row_order(name: str) -> tuple:
    fixed = ["sdlora", "oracle", "even2", "even3", "even4", "even5", "gumbel"]
    return (fixed.index(name), name) if name in fixed else (len(fixed), name)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log_dir", type=Path)
    ap.add_argument("--protocol", default="quick_unnormalised")
    ap.add_argument("--rules", nargs="*", default=None,
                    help="rows judged by the bar (default: gumbel, need*, fit*, novelty*)")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    ap.add_argument("--recorded", type=Path, help="a CSV of rows measured before (exps/results/need_quick_recorded.csv)"
                    "; a run at hand with the same stream, row and seed replaces its row")
    args = ap.parse_args(argv)
    rows = load_rows(args.log_dir, args.protocol)
    if args.recorded:
        rows = merged(rows, load_recorded(args.recorded))
    if not rows:
        print(f"no finished 10-task run of protocol {args.protocol} under {args.log_dir}", file=sys.stderr)
        return 2
    rules = args.rules if args.rules is not None else sorted(
        {r.row for r in rows if r.row == "gumbel" or r.row.startswith(("need", "fit", "novelty"))})
    text = "## Every run\n\n" + runs_table(rows) + "\n\n## Per stream kind\n" + summary(rows, rules)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
