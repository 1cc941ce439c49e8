"""Atomic file writes, safetensors checkpoints and run folders: nothing half-written survives a crash."""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from utils import dist


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it.
    Under torchrun only rank 0 writes: every file of a run is written once."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(path: Path, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, w)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Tensors to a .safetensors file (contiguous CPU copies), atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (was the run made with save_adapters false?)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a safetensors file: {e}") from None


def save_torch(path: Path, obj: Any) -> None:
    """torch.save of plain tensors / dicts of tensors (never modules), atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def new_run_dir(log_dir: str, name: str) -> Path:
    """A fresh folder log_dir/<name>_<timestamp>[_n] for one run; never reuses an existing one.
    Under torchrun rank 0 makes it and every rank gets its path."""
    if not dist.is_main():
        return Path(dist.broadcast(None))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(log_dir) / f"{name}_{stamp}"
    run, n = base, 1
    while run.exists():
        run, n = Path(f"{base}_{n}"), n + 1
    run.mkdir(parents=True)
    return Path(dist.broadcast(str(run)))
