"""Does a cheaper protocol rank methods as the reference protocol does? Side-by-side A_last / A_avg, Kendall's tau
of the two rankings and the pairs that swap, per seed.

    python benchmarks/protocol_check.py --runs logs/quick_* logs/offline_* \
        --given sdlora,offline,1993,45.00,51.78 [--reference offline] [--candidate quick] [--gap 2]

A run folder's protocol is the file its config.json recorded (its name without .json), its row the config's
``prefix`` without that name (``quick_sdlora`` -> row ``sdlora``: the prefix run.sh quick gives);
``--given ROW,PROTOCOL,SEED,A_LAST,A_AVG`` adds a number measured earlier whose folder is gone. The bar printed
at the end: tau >= 0.7 and every pair that differs by >= ``--gap`` points of A_last on the reference protocol
keeps its order on the candidate.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (ties allowed)."""
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    n_a, n_b = conc + disc + ties_a, conc + disc + ties_b
    return (conc - disc) / (n_a * n_b) ** 0.5 if n_a and n_b else float("nan")


def swapped_pairs(rows: list[str], ref: list[float], cand: list[float]) -> list[tuple[str, str, float]]:
    """Pairs ordered one way by the reference and the other way by the candidate, with the reference gap."""
    out = []
    for i, j in itertools.combinations(range(len(rows)), 2):
        if (ref[i] - ref[j]) * (cand[i] - cand[j]) < 0:
            out.append((rows[i], rows[j], abs(ref[i] - ref[j])))
    return out


def read_runs(folders: list[str], table: dict) -> None:
    for f in folders:
        cfg = json.loads((Path(f) / "config.json").read_text())
        metrics = json.loads((Path(f) / "metrics.json").read_text())
        prefix = cfg["prefix"]
        proto = Path(cfg.get("protocol") or "").stem or prefix.partition("_")[0]  # the file the run recorded
        row = prefix[len(proto) + 1:] if prefix.startswith(proto + "_") else prefix
        table[(row, proto, int(cfg["seed"]))] = (metrics["A_last"], metrics["A_avg"], len(metrics["A"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="run folders (prefix PROTOCOL_ROW)")
    ap.add_argument("--given", nargs="*", default=[], metavar="ROW,PROTOCOL,SEED,A_LAST,A_AVG")
    ap.add_argument("--reference", default="offline")
    ap.add_argument("--candidate", default="quick")
    ap.add_argument("--gap", type=float, default=2.0)
    args = ap.parse_args(argv)
    table: dict = {}
    for g in args.given:
        row, proto, seed, a_last, a_avg = g.split(",")
        table[(row, proto, int(seed))] = (float(a_last), float(a_avg), None)
    read_runs(args.runs, table)
    most = max((n for *_, n in table.values() if n is not None), default=None)
    for key in [k for k, v in table.items() if v[2] is not None and v[2] < most]:  # a run still going, or cut short
        print(f"(left out: {key[0]} on {key[1]}, seed {key[2]}: {table.pop(key)[2]} of {most} tasks)")
    ok = True
    for seed in sorted({s for _, _, s in table}):
        rows = sorted({r for r, p, s in table if s == seed and (r, args.reference, s) in table
                       and (r, args.candidate, s) in table})
        if len(rows) < 2:
            continue
        ref = [table[(r, args.reference, seed)][0] for r in rows]
        cand = [table[(r, args.candidate, seed)][0] for r in rows]
        print(f"\n## seed {seed}: {len(rows)} rows, A_last / A_avg\n")
        print(f"| row | {args.reference} | {args.candidate} | rank {args.reference} | rank {args.candidate} |")
        print("|---|---|---|---|---|")
        rank = lambda v: {i: k + 1 for k, i in enumerate(sorted(range(len(v)), key=lambda i: -v[i]))}  # noqa: E731
        rr, rc = rank(ref), rank(cand)
        for i, r in enumerate(rows):
            a, c = table[(r, args.reference, seed)], table[(r, args.candidate, seed)]
            print(f"| {r} | {a[0]:.2f} / {a[1]:.2f} | {c[0]:.2f} / {c[1]:.2f} | {rr[i]} | {rc[i]} |")
        tau = kendall_tau(ref, cand)
        tau_avg = kendall_tau([table[(r, args.reference, seed)][1] for r in rows],
                              [table[(r, args.candidate, seed)][1] for r in rows])
        swaps = swapped_pairs(rows, ref, cand)
        big = [s for s in swaps if s[2] >= args.gap]
        print(f"\nKendall tau (A_last) {tau:.3f}, (A_avg) {tau_avg:.3f}; pairs that swap on A_last: "
              + (", ".join(f"{a} / {b} ({g:.2f} apart on {args.reference})" for a, b, g in swaps) or "none"))
        passed = tau >= 0.7 and not big
        ok &= passed
        print(f"bar (tau >= 0.7, no swap of a pair >= {args.gap} apart): {'passed' if passed else 'not passed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
