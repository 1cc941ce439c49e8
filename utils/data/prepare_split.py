"""Split a raw ImageNet-R / ImageNet-A download (one folder per class) into train/ and test/, once.

    python -m utils.data.prepare_split --src /data/imagenet-r --dst data/imagenetr [--seed 1993] [--test_fraction 0.2]

The split is the published code's: torchvision's ImageFolder order (classes and files sorted), a permutation
``torch.randperm(N)`` from a generator seeded with ``seed`` (what ``random_split`` draws after
``torch.manual_seed(seed)``), the first ``int((1 - test_fraction) * N)`` images train, the rest test; over the
whole set, not per class. Files are linked (``--mode symlink``, default), hard-linked or copied into a
temporary folder that is renamed to ``dst`` when complete; ``dst/split.json`` records the source, the seed and
every file. Running it again with the same arguments finds the split and changes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch


class SplitError(ValueError):
    """A source, destination or argument the split cannot use: exit 2, the message names it and the fix."""


class WriteFailed(OSError):
    """The split could not be written (exit 74, as main.py's failed writes); nothing half-made is left."""


def split_indices(n: int, seed: int, test_fraction: float) -> tuple[list[int], list[int]]:
    """Train and test positions of n images: random_split's permutation after torch.manual_seed(seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int((1 - test_fraction) * n)
    return perm[:n_train], perm[n_train:]


def plan(src: Path, seed: int, test_fraction: float) -> dict:
    """The split as a record: relative paths of the train and test files."""
    from torchvision.datasets import ImageFolder
    try:
        samples = ImageFolder(str(src)).samples
    except (OSError, RuntimeError) as e:
        raise SplitError(f"--src '{src}' is not a folder of class folders with images ({e}); give the raw download's "
                         "folder (one folder per class)") from None
    rel = [str(Path(p).relative_to(src)) for p, _ in samples]
    tr, te = split_indices(len(rel), seed, test_fraction)
    return {"source": str(src.resolve()), "seed": seed, "test_fraction": test_fraction,
            "n_train": len(tr), "n_test": len(te), "train": [rel[i] for i in tr], "test": [rel[i] for i in te]}


def _place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def prepare(src: Path, dst: Path, seed: int = 1993, test_fraction: float = 0.2, mode: str = "symlink") -> dict:
    """Write dst/train, dst/test and dst/split.json; a finished dst with the same split is left as it is."""
    record = plan(src, seed, test_fraction)
    done = dst / "split.json"
    if dst.exists() and not dst.is_dir():
        raise SplitError(f"--dst '{dst}' is a file; choose a folder")
    if done.is_file():
        try:
            old = json.loads(done.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            raise SplitError(f"'{done}' is damaged ({e}); remove --dst '{dst}' and split again") from None
        if {k: old.get(k) for k in ("seed", "test_fraction", "train", "test")} == \
                {k: record[k] for k in ("seed", "test_fraction", "train", "test")}:
            print(f"prepare_split: '{dst}' already holds this split ({record['n_train']} train, "
                  f"{record['n_test']} test); nothing to do")
            return record
        raise SplitError(f"--dst '{dst}' holds another split (seed {old.get('seed')}, test_fraction "
                         f"{old.get('test_fraction')}); choose another --dst or remove it")
    if dst.exists() and any(dst.iterdir()):
        raise SplitError(f"--dst '{dst}' exists and is not a finished split; choose another --dst or remove it")
    parent = dst.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SplitError(f"--dst '{dst}' cannot be made: '{parent}' is not a writable folder; choose another --dst")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for part in ("train", "test"):
            for r in record[part]:
                _place(src / r, tmp / part / r, mode)
        (tmp / "split.json").write_text(json.dumps(record, indent=1))
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except OSError as e:  # a full disk, a file system without links (--mode): nothing is left half-made
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(f"could not write the split into '{dst}' ({e.strerror or e}); free space, or try "
                          "--mode copy where links are not allowed, then run it again") from None
    print(f"prepare_split: wrote {record['n_train']} train and {record['n_test']} test images ({mode}) to '{dst}'")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="the raw download: one folder per class")
    ap.add_argument("--dst", type=Path, required=True, help="the split's folder (data_path of the runs)")
    ap.add_argument("--seed", type=int, default=1993, help="seed of the permutation (default 1993)")
    ap.add_argument("--test_fraction", type=float, default=0.2, help="share of images in test (default 0.2)")
    ap.add_argument("--mode", choices=("symlink", "hardlink", "copy"), default="symlink")
    a = ap.parse_args(argv)
    try:
        if not 0 < a.test_fraction < 1:
            raise SplitError(f"--test_fraction {a.test_fraction} must lie in (0, 1), e.g. 0.2")
        prepare(a.src, a.dst, a.seed, a.test_fraction, a.mode)
    except SplitError as e:
        print(f"error: prepare_split: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: prepare_split: {e}", file=sys.stderr)
        return 74
    return 0


if __name__ == "__main__":
    sys.exit(main())
