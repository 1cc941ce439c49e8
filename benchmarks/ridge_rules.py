"""How RanPAC's ridge head fares under other ways of choosing its ridge, replayed over a finished run's features.

    python benchmarks/ridge_rules.py RUN_DIR [--view first] [--rules task seen fixed:1e5 max_first] [--ranpac_dim M]

RanPAC chooses each task's ridge on that task's own images (80 % fit, 20 % scored, as ``choose_ridge``); on a long
stream of small tasks (quick_50: 60 images, 2 classes) that search often lands on 1e-8, the bottom of its grid. The
head is then G over every image seen with a ridge the search scored on two classes. Rules, each giving a ridge per
task for the same G and Q:

- ``task``: RanPAC's (the head as it runs);
- ``seen``: the ridge of the lowest error on the task's held-out 20 %, the fit over every other image seen (the head
  that will be used, all its classes scored);
- ``fixed:X``: X at every task;
- ``max_first``: the larger of the task's choice and task 0's.

Every fit is computed in dual form, H^T (H H^T + l I)^-1 Y over the N <= M images seen, which equals the head's
``solve`` (tested) at a fraction of its cost while N < M. Features: ``RUN_DIR/head_features.safetensors`` as
``benchmarks/heads.py`` caches them; ``--view first`` (the backbone as task 0 left it: ``first_session_head``, and
what RanPAC with first-session adaptation sees) or ``final`` (training images through the final backbone; tests
through it are not cached, so only ``first`` has test accuracy).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.base import task_seed  # noqa: E402
from models.heads import RIDGES, choose_ridge, random_projection  # noqa: E402


class DualRidge:
    """The ridge head's fit over the images seen so far, kept as the images' projections (N x M), in dual form."""

    def __init__(self, H: torch.Tensor, y: torch.Tensor, n_classes: int):
        self.H, self.Y = H, torch.nn.functional.one_hot(y, n_classes).double()
        s, self.U = torch.linalg.eigh(H @ H.t())
        self.s = s.clamp_min(0)

    def scores(self, x: torch.Tensor, ridge: float) -> torch.Tensor:
        """x's scores under W = H^T (H H^T + ridge I)^-1 Y."""
        return (x @ self.H.t() @ self.U) @ ((self.U.t() @ self.Y) / (self.s + ridge)[:, None])

    def best_ridge(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The grid's ridge of the lowest squared error on (x, y), as ``choose_ridge`` scores one."""
        Y = torch.nn.functional.one_hot(y, self.Y.shape[1]).double()
        errors = [float(((self.scores(x, r) - Y) ** 2).mean()) for r in RIDGES]
        return float(RIDGES[int(np.argmin(errors))])


def replay(F: dict, view: str, sizes: list[int], seed: int, M: int, rules: list[str]) -> dict[str, list[float]]:
    """A_t of every rule, t = 0 .. T-1: each task's images in the order the head takes them, its ridge per rule."""
    W = random_projection(F[f"{view}.train"].shape[1], M, seed)
    H_all = torch.relu(F[f"{view}.train"].float() @ W).double()
    y_all, Ht, yt = F[f"{view}.y_train"], torch.relu(F[f"{view}.test"].float() @ W).double(), F[f"{view}.y_test"]
    acc: dict[str, list[float]] = {r: [] for r in rules}
    seen, first, lo = [], None, 0
    for t, size in enumerate(sizes):
        hi = lo + size
        idx = torch.nonzero((y_all >= lo) & (y_all < hi)).flatten()
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(task_seed(seed, t)))]
        seen.append(idx)
        mine = choose_ridge(H_all[idx], y_all[idx] - lo, size)[0]
        first = mine if first is None else first
        head = DualRidge(H_all[torch.cat(seen)], y_all[torch.cat(seen)], hi)
        test = yt < hi
        n = int(len(idx) * 0.8)
        for rule in rules:
            if rule == "task":
                ridge = mine
            elif rule == "max_first":
                ridge = max(mine, first)
            elif rule == "seen":
                rest = torch.cat(seen[:-1] + [idx[:n]])
                ridge = DualRidge(H_all[rest], y_all[rest], hi).best_ridge(H_all[idx[n:]], y_all[idx[n:]])
            else:
                ridge = float(rule.split(":", 1)[1])
            pred = head.scores(Ht[test], ridge).argmax(1)
            acc[rule].append(float((pred == yt[test]).double().mean() * 100))
        lo = hi
    return acc


def _fixed(rule: str) -> bool:
    """Whether ``rule`` is ``fixed:X`` with X a number."""
    head, _, value = rule.partition(":")
    try:
        return head == "fixed" and float(value) >= 0
    except ValueError:
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--view", default="first")
    ap.add_argument("--rules", nargs="+", default=["task", "seen", "max_first", "fixed:1e5"])
    ap.add_argument("--ranpac_dim", type=int, default=10000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    for rule in args.rules:
        if rule not in ("task", "seen", "max_first") and not _fixed(rule):
            raise SystemExit(f"--rules: unknown rule {rule!r} (task, seen, max_first, fixed:X with X a number)")
    cache = args.run_dir / "head_features.safetensors"
    if not cache.is_file():
        raise SystemExit(f"{cache} not found: run python benchmarks/heads.py {args.run_dir} first (it caches it)")
    F = load_file(str(cache))
    if f"{args.view}.test" not in F:
        raise SystemExit(f"--view {args.view}: the cache has no {args.view}.test (first: replay a "
                         "`@ridge` variant with benchmarks/heads.py to cache it)")
    seed = json.loads((args.run_dir / "config.json").read_text())["seed"]
    acc = replay(F, args.view, [int(s) for s in F["sizes"]], seed, args.ranpac_dim, args.rules)
    print("rule | A_last | A_avg | lowest A_t (task)")
    out = {}
    for rule, a in acc.items():
        out[rule] = {"A_last": a[-1], "A_avg": float(np.mean(a)), "curve": a}
        print(f"{rule} | {a[-1]:.2f} | {np.mean(a):.2f} | {min(a):.2f} ({int(np.argmin(a))})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
