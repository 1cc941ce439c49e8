"""Where growth on novelty grows, on every stream of the growth table, without training a single step.

    python benchmarks/novelty_decisions.py --config exps/sdlora_c100.json --protocol P --data_path D \\
        --pretrained_path W --seeds 1993 1994 --kinds grey_invert patch_shuffle \\
        --placements 3,4,8 2,5,7 1,6,9 --thresholds 0.03 0.045 0.06 --max_share 5 [--json OUT]

The rule's decision (models/novelty_growth.py) reads only the pretrained backbone and the task's images: the mean
and spread of the middle block's tokens, compared with those of the tasks the latest adapter serves. Training
never changes it. So the decisions of a run follow from the token statistics of each task, plain and shown as each
shift kind, for the seed's class order: this script computes those once per seed and replays the rule on every
stream and threshold, printing where it grows, the shifted tasks it hit and the others it grew at (the bar of
docs/growth.md). tests/test_novelty_growth.py checks the replay against a trained run's own record.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.need_probe import shown_as, token_stats  # noqa: E402
from models import get_learner  # noqa: E402
from models.novelty_growth import Stats, decide, novelty_from  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.config.reading import parse_overrides  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402


def novelty_against(stats: list[Stats], task: int, tasks: list[int]) -> float:
    """The rule's signal (models/novelty_growth.py): task's mean token against the pooled statistics of ``tasks``."""
    return novelty_from(stats[task][0], [stats[s] for s in tasks])


def replay(stats: list[Stats], threshold: float, max_share: int | None, reference: str = "latest",
           reopen: str = "latest") -> list[dict]:
    """The rule on one stream, with the run's own ``decide``: task 0 owns adapter 0; task t >= 1 grows if its
    novelty exceeds ``threshold`` or the adapter it would reopen already serves ``max_share`` tasks, else it
    joins that adapter's tasks (the latest adapter's, or with ``reopen`` "nearest" the nearest one's). The novelty
    is against the latest adapter's tasks (``reference`` "latest") or the least over every adapter's ("nearest")."""
    groups, records = {0: [0]}, []  # adapter (the task that made it) -> the tasks it served
    for t in range(1, len(stats)):
        served = {a: [stats[s] for s in g] for a, g in groups.items()}
        d = decide(stats[t][0], served, max(groups), threshold, max_share, reference, reopen)
        records.append({"task": t, **{k: d[k] for k in ("novelty", "nearest", "reopened", "served", "full", "grow")}})
        if d["grow"]:
            groups[t] = [t]
        else:
            groups[d["reopened"]].append(t)
    return records


def grew_at(records: list[dict]) -> list[int]:
    return [0] + [r["task"] for r in records if r["grow"]]


def owners(records: list[dict]) -> list[int]:
    """The adapter each task trained: its own where it grew, else the one it reopened."""
    return [0] + [r["task"] if r["grow"] else r["reopened"] for r in records]


def same_domain(owner: list[int], shifted: list[int]) -> int:
    """How many tasks trained an adapter founded by a task of their own domain (shifted or plain): what growing
    at a shift is for, read off where each task went."""
    return sum((t in shifted) == (a in shifted) for t, a in enumerate(owner))


#: The variants --reference names: (novelty_reference, novelty_reopen).
VARIANTS = {"latest": ("latest", "latest"), "nearest": ("nearest", "latest"), "nearest_reopen": ("nearest", "nearest")}


def seed_stats(cfg, seed: int, kinds: list[str], cache: Path | None = None) -> dict[str | None, list[Stats]]:
    """Per column (None: plain, else a shift kind): each task's token statistics at the rule's block (read from
    ``cache``/stats_SEED.pt when there, written there once computed)."""
    f = cache / f"stats_{seed}.pt" if cache else None
    if f is not None and f.is_file():
        have = torch.load(f)
        if all(k in have for k in [None] + kinds):
            return have
    dm = DataManager.for_config(cfg, load_dataset(cfg), seed)
    with tempfile.TemporaryDirectory() as tmp:
        learner = get_learner(cfg.model_name)(cfg, torch.device("cpu"), Path(tmp), seed)
        block = len(learner.net.backbone.vit.blocks) // 2 - 1
        cols = {k: [token_stats(learner, shown_as(dm.train_set(t, learner.test_tf), k), [block])[block]
                    for t in range(dm.n_tasks)] for k in [None] + kinds}
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cols, f)
    return cols


def stream(cols: dict[str | None, list[Stats]], kind: str | None, shifted: list[int]) -> list[Stats]:
    return [cols[kind if t in shifted else None][t] for t in range(len(cols[None]))]


def summary(out: list[dict]) -> str:
    """Per reference and threshold: over the shifted streams, the share of shifted tasks grown at and of the
    others (task 0 left out), the adapters; over the plain streams, the adapters and where they grew."""
    lines = ["reference | threshold | shifted streams: shifted grown, others grown, adapters (mean), tasks on an "
             "adapter of their domain | plain streams: adapters (mean), grew at"]
    for ref, thr in dict.fromkeys((o["reference"], o["threshold"]) for o in out):
        mine = [o for o in out if (o["reference"], o["threshold"]) == (ref, thr)]
        sh = [o for o in mine if o["shift_tasks"]]
        pl = [o for o in mine if not o["shift_tasks"]]
        hit = sum(t in o["grew_at"] for o in sh for t in o["shift_tasks"])
        n_hit = sum(len(o["shift_tasks"]) for o in sh)
        others = [(t in o["grew_at"]) for o in sh for t in range(1, len(o["records"]) + 1) if t not in o["shift_tasks"]]
        home = sum(same_domain(o["owners"], o["shift_tasks"]) for o in sh)
        cell = (f"{hit}/{n_hit}, {sum(others)}/{len(others)}, {sum(len(o['grew_at']) for o in sh) / len(sh):.2f}, "
                f"{home}/{sum(len(o['owners']) for o in sh)}" if sh else "-")
        plain = (f"{sum(len(o['grew_at']) for o in pl) / len(pl):.2f}, "
                 + " ".join(sorted({str(o["grew_at"]).replace(" ", "") for o in pl})) if pl else "-")
        lines.append(f"{ref} | {thr} | {cell} | {plain}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--protocol")
    ap.add_argument("--seeds", nargs="+", type=int, required=True)
    ap.add_argument("--kinds", nargs="*", default=["grey_invert", "patch_shuffle"])
    ap.add_argument("--placements", nargs="*", default=["3,4,8", "2,5,7", "1,6,9"])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.045])
    ap.add_argument("--max_share", type=int, default=None)
    ap.add_argument("--reference", nargs="+", choices=list(VARIANTS), default=["latest"],
                    help="novelty against the latest adapter's tasks, or the least over every adapter's, reopening "
                         "the latest (nearest) or the nearest adapter (nearest_reopen: novelty_reopen nearest)")
    ap.add_argument("--cache", type=Path, help="keep each seed's token statistics here (they depend on the "
                    "protocol, data, weights and seed only)")
    ap.add_argument("--json", type=Path, help="write every stream's records here as well")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.protocol:
        overrides["protocol"] = args.protocol
    cfg = load_config(args.config, dict(overrides, shift_tasks=[]))
    out = []
    print("seed | stream | reference | threshold | grew at | adapters | shifted grown | others grown "
          "| adapter trained per task | novelty per task")
    for seed in args.seeds:
        cols = seed_stats(cfg, seed, args.kinds, args.cache)
        streams = [("plain", None, [])] + [(f"{k}_{p.replace(',', '')}", k, [int(t) for t in p.split(",")])
                                            for k in args.kinds for p in args.placements]
        for name, kind, shifted in streams:
            for ref, thr in [(r, t) for r in args.reference for t in args.thresholds]:
                rec = replay(stream(cols, kind, shifted), thr, args.max_share, *VARIANTS[ref])
                at = grew_at(rec)
                others = [t for t in range(1, len(rec) + 1) if t not in shifted]
                hit = f"{sum(t in at for t in shifted)}/{len(shifted)}" if shifted else "-"
                grown = f"{sum(t in at for t in others)}/{len(others)}"
                print(f"{seed} | {name} | {ref} | {thr} | {at} | {len(at)} | {hit} | {grown} | {owners(rec)}"
                      f" | {' '.join(format(r['novelty'], '.3f') for r in rec)}", flush=True)
                out.append({"seed": seed, "stream": name, "shift_kind": kind, "shift_tasks": shifted,
                            "reference": ref, "threshold": thr, "max_share": args.max_share, "grew_at": at,
                            "owners": owners(rec), "records": rec})
    print(summary(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
