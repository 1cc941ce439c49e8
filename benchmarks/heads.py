"""Every statistics head, and the drift of old classes' statistics, replayed over one finished run.

    python benchmarks/heads.py RUN_DIR [--cache FILE] [--variants ncm ridge aligned ...] [--json OUT]

The backbone a run ends each task with is rebuilt from its checkpoints (and the pretrained one, before any
task), and every training and test image of the run goes through each: features F_t (cached in ``--cache``).
The adapters train the same whatever the head (the loss sees only the current task's logits and its head rows),
so one run gives every head its numbers:

- each head (``models/heads.py``) with each task's statistics taken from F_t of that task's images, as a run
  with ``head`` set takes them, with and without drift compensation (old classes moved by what task t's images
  show between F_{t-1} and F_t);
- the ceiling: the same head fitted on every training image through the final backbone (old images re-read: a
  bound on A_last, not a method);
- drift: how far each old class's stored mean is from the mean the final backbone gives its images (relative to
  that mean's norm), with and without each compensation.

A_t is the accuracy on the test images of the classes seen after task t, through F_t; A_last and A_avg as runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import get_learner  # noqa: E402
from models.heads import HEADS, AlignedHead  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.run_folder import read_config  # noqa: E402
from utils.data.data_manager import DataManager  # noqa: E402
from utils.data.datasets import load_dataset  # noqa: E402
from utils.metrics import summarize  # noqa: E402


@torch.no_grad()
def _features(learner, ds) -> torch.Tensor:
    learner.net.eval()
    return torch.cat([learner.net.backbone(x.to(learner.device)).float().cpu()
                      for x, _ in learner.loader(ds, train=False, task=0)])


def _run_data(run_dir: Path):
    """The finished run's config (as it ran) and its data, split as it was."""
    cfg = build_config(dict(read_config(run_dir, "RUN_DIR"), log_dir=str(run_dir.parent)))
    return cfg, DataManager.for_config(cfg, load_dataset(cfg), cfg.seeds[0])


def cache_features(run_dir: Path, cache: Path) -> dict[str, torch.Tensor]:
    """Through the backbone after each task t: the training images of tasks t and t+1 (``train.t``, labels
    ``y_train.t``) and the test images of the classes seen (``test.t``, ``y_test.t``); through the final one, every
    training image (``final``, ``y_final``); the linear head each task left. Read from ``cache`` when there."""
    if cache.is_file():
        return load_file(str(cache))
    cfg, dm = _run_data(run_dir)
    seed = cfg.seeds[0]
    done = len(json.loads((run_dir / "metrics.json").read_text())["A"])
    cls = get_learner(cfg.model_name)
    out = {}
    for t in range(done):
        t0 = time.perf_counter()
        learner = cls(cfg, torch.device("cpu"), run_dir, seed)
        learner.restore_network(dm, t)
        ck = load_file(str(run_dir / f"task_{t}.safetensors"))
        out[f"head_w.{t}"], out[f"head_b.{t}"] = ck["head.weight"].float(), ck["head.bias"].float()
        lo, _ = dm.task_range(t)
        hi = dm.classes_upto(min(t + 1, done - 1))
        train = dm._subset(dm._train, lo, hi, learner.test_tf)
        test = dm.test_set(t, learner.test_tf)
        out[f"train.{t}"], out[f"y_train.{t}"] = _features(learner, train), torch.as_tensor(train.labels)
        out[f"test.{t}"], out[f"y_test.{t}"] = _features(learner, test), torch.as_tensor(test.labels)
        if t == done - 1:
            final = dm._subset(dm._train, 0, dm.classes_upto(t), learner.test_tf)
            out["final"], out["y_final"] = _features(learner, final), torch.as_tensor(final.labels)
        if t == 0:  # the backbone as task 0 left it (first_session_head): its view of every image, kept apart
            first = _first_session_features(learner, dm, done - 1)
        print(f"features after task {t}: {time.perf_counter() - t0:.1f} s", flush=True)
    out["sizes"] = torch.tensor(dm.sizes[:done])
    out.update(first)
    save_file({k: v.contiguous() for k, v in out.items()}, str(cache))
    return out


def _first_session_features(learner, dm, last: int) -> dict[str, torch.Tensor]:
    """Every training image and the last task's test images through the backbone as task 0 left it, as a run with
    ``first_session_head`` sees them (its adapter sum copied, ``LoRAViT.snapshot``): ``first.train``/``first.test``
    and their labels, in the data's order (each task's selection of them is in that order too)."""
    view = learner.net.backbone.snapshot()
    train = dm._subset(dm._train, 0, dm.classes_upto(last), learner.test_tf)
    test = dm.test_set(last, learner.test_tf)
    with learner.net.backbone.viewing(view):
        return {"first.train": _features(learner, train), "first.y_train": torch.as_tensor(train.labels),
                "first.test": _features(learner, test), "first.y_test": torch.as_tensor(test.labels),
                "first.view_numbers": torch.tensor(sum(v.numel() for triple in view for v in triple))}


def add_first_session(run_dir: Path, cache: Path, F: dict) -> dict:
    """A cache made before the first-session view was replayed: its ``first.*`` entries added (one pass over the
    images through the task-0 backbone)."""
    if "first.train" in F:
        return F
    cfg, dm = _run_data(run_dir)
    learner = get_learner(cfg.model_name)(cfg, torch.device("cpu"), run_dir, cfg.seeds[0])
    learner.restore_network(dm, 0)
    F = dict(F, **_first_session_features(learner, dm, len(F["sizes"]) - 1))
    save_file({k: v.contiguous() for k, v in F.items()}, str(cache))
    return F


def _first_view(F: dict, key: str) -> torch.Tensor:
    """F[key]'s images (train.t or test.t) as the first-session view gives them."""
    part = key.split(".")[0]
    y = F[f"y_{key}"]
    sel = torch.isin(F[f"first.y_{part}"], y.unique())
    if not torch.equal(F[f"first.y_{part}"][sel], y):
        raise ValueError(f"the first-session features do not line up with {key}: the cache is not of one run")
    return F[f"first.{part}"][sel]


class _Cfg:
    """The head keys a replay uses (the schema's defaults unless given)."""

    def __init__(self, **kw):
        from utils.config import DEFAULTS
        for k in ("ranpac_dim", "align_samples", "align_epochs", "align_lr", "align_temperature", "sdc_sigma"):
            setattr(self, k, kw.get(k, getattr(DEFAULTS, k)))


def replay(F: dict, head: str, compensation: str = "none", oracle: bool = False, seed: int = 1993,
           cfg: _Cfg | None = None, first: str | None = None) -> dict:
    """A_t, A_last, A_avg of ``head`` fed as a run feeds it, and the final drift of its stored means; with
    ``oracle``, A_last of the head fitted on every training image through the final backbone; with ``first``, the
    ``first_session_head`` of that kind beside it (its logits added, as a run adds them)."""
    cfg = cfg or _Cfg()
    sizes = [int(s) for s in F["sizes"]]
    bounds = np.cumsum([0] + sizes)
    T = len(sizes) - 1
    d = F["train.0"].shape[1]
    if oracle:
        h = HEADS[head](d, seed, torch.device("cpu"), cfg)
        for s in range(T + 1):
            a, b = int(bounds[s]), int(bounds[s + 1])
            sel = (F["y_final"] >= a) & (F["y_final"] < b)
            if isinstance(h, AlignedHead):  # from the final linear head's rows, the earlier ones as aligned
                h.set_start(torch.cat([h.weight, F[f"head_w.{T}"][a:b]]), torch.cat([h.bias, F[f"head_b.{T}"][a:b]]))
            h.observe(s, F["final"][sel], F["y_final"][sel], range(a, b))
        y = F[f"y_test.{T}"]
        acc = 100.0 * float((h.logits(F[f"test.{T}"]).argmax(1) == y).double().mean())
        return {"A_last": acc}
    A, matrix = [], []
    h = HEADS[head](d, seed, torch.device("cpu"), cfg) if head != "linear" else None
    h0 = HEADS[first](d, seed, torch.device("cpu"), cfg) if first else None
    for t, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        lo, hi = int(lo), int(hi)
        f, y = F[f"train.{t}"], F[f"y_train.{t}"]
        if h is None:
            logits = F[f"test.{t}"] @ F[f"head_w.{t}"].t() + F[f"head_b.{t}"]
        else:
            sel = (y >= lo) & (y < hi)
            if t > 0 and compensation != "none":
                prev, yp = F[f"train.{t - 1}"], F[f"y_train.{t - 1}"]
                before = prev[(yp >= lo) & (yp < hi)]
                h.compensate(compensation, before, f[sel], cfg.sdc_sigma)
            if isinstance(h, AlignedHead):  # old rows as aligned before, the new ones as training left them
                w, b = F[f"head_w.{t}"], F[f"head_b.{t}"]
                h.set_start(torch.cat([h.weight, w[h.n_classes:]]), torch.cat([h.bias, b[h.n_classes:]]))
            h.observe(t, f[sel], y[sel], range(lo, hi))
            logits = h.logits(F[f"test.{t}"])
            if h0 is not None:
                h0.observe(t, _first_view(F, f"train.{t}")[sel], y[sel], range(lo, hi))
                logits = logits + h0.logits(_first_view(F, f"test.{t}"))
        yt = F[f"y_test.{t}"]
        hit = (logits.argmax(1) == yt).double()
        A.append(100.0 * float(hit.mean()))
        matrix.append([100.0 * float(hit[(yt >= bounds[j]) & (yt < bounds[j + 1])].mean()) for j in range(t + 1)])
    out = dict(summarize(matrix, A), A=A, accuracy_matrix=matrix)
    if h is not None:
        true = torch.stack([F["final"][F["y_final"] == c].double().mean(0) for c in range(h.n_classes)])
        rel = ((h.means - true).norm(dim=1) / true.norm(dim=1)).numpy()
        out["drift"] = {f"task {s}": float(rel[bounds[s]:bounds[s + 1]].mean()) for s in range(len(sizes))}
        out["head_stored_numbers"] = h.stored_numbers() + (
            h0.stored_numbers() + int(F.get("first.view_numbers", 0)) if h0 is not None else 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cache", type=Path, help="the features file (default RUN_DIR/head_features.safetensors)")
    ap.add_argument("--variants", nargs="*", default=["linear", "ncm", "ncm+sdc", "feature_ridge",
                                                       "feature_ridge+sdc", "ridge", "aligned", "aligned+sdc",
                                                       "oracle:ncm", "oracle:feature_ridge", "oracle:ridge"],
                    help="HEAD[+COMPENSATION][@FIRST] (FIRST: a first_session_head beside it) or oracle:HEAD")
    ap.add_argument("--ranpac_dim", type=int, help="M of the ridge head (default: the schema's)")
    ap.add_argument("--sdc_sigma", type=float)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    F = cache_features(args.run_dir, args.cache or args.run_dir / "head_features.safetensors")
    seed = read_config(args.run_dir, "RUN_DIR")["seed"]
    cfg = _Cfg(**{k: v for k, v in vars(args).items() if k in ("ranpac_dim", "sdc_sigma") and v is not None})
    rows = {}
    print("variant | A_last | A_avg | forgetting | drift of task 0's means at the end (relative)")
    for v in args.variants:
        t0 = time.perf_counter()
        oracle = v.startswith("oracle:")
        name, _, first = v.split(":")[-1].partition("@")
        head, _, comp = name.partition("+")
        if first:
            F = add_first_session(args.run_dir, args.cache or args.run_dir / "head_features.safetensors", F)
        r = replay(F, head, comp or "none", oracle, seed, cfg, first or None)
        rows[v] = r
        d = r.get("drift", {}).get("task 0")
        print(f"{v} | {r['A_last']:.2f} | {r.get('A_avg', float('nan')):.2f} | "
              f"{r.get('forgetting', float('nan')):.2f} | "
              f"{'' if d is None else f'{d:.3f}'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir.resolve()), "sdc_sigma": cfg.sdc_sigma,
                                         "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
