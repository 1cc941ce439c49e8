"""Atomic file writes, safetensors checkpoints and run folders: nothing half-written survives a crash."""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from utils import dist

if TYPE_CHECKING:  # torch is imported where tensors are written or read: run folders are read without it (sweeps)
    import torch


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it.
    Under torchrun only rank 0 writes: every file of a run is written once."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # full disk, lost mount, read-only file system: the old file (if any) is untouched
        raise WriteError(f"could not write '{path}': {e.strerror or e}. Every file saved before it is intact; "
                         f"free space or fix the mount, then continue with python main.py --resume "
                         f"{path.parent}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


class WriteError(OSError):
    """A file of the run could not be written; nothing saved before it was touched."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder (it is still training it)."""


class RunLock:
    """An exclusive lock on a run folder (``RUN_DIR/.lock``, flock) for as long as a process trains it: a
    second process (a ``--resume`` of a folder still training) is refused, and told which process holds it.
    The kernel drops the lock when its process ends, however it ends (SIGKILL included)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        if not dist.is_main():  # one run, one lock: rank 0 holds it for every process of a torchrun
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunFolderBusy(f"run folder '{self.path.parent}' is in use by {holder}; wait for it to "
                                    "finish or stop it, then --resume") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def save_json(path: Path, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, w)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Tensors to a .safetensors file (contiguous CPU copies), atomically."""
    from safetensors.torch import save_file
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


def load_tensors(path: Path, prefixes: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
    """Read a .safetensors file (with ``prefixes``, only the tensors whose names start with one of them: the rest
    is not read), with an error that names the file when it is missing or corrupt."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (was the run made with save_adapters false?)")
    try:
        if prefixes is None:
            return load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a safetensors file: {e}") from None


def read_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata (its header alone, no tensor read); CheckpointError naming the file when
    the header is damaged or the file is shorter than the header says."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as f:  # the header alone: no framework's tensors, so no torch import
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a safetensors file ({e}); restore it from a "
                              "copy, or fork the tasks before it (--fork_from RUN --fork_task K)") from None


def save_torch(path: Path, obj: Any) -> None:
    """torch.save of plain tensors / dicts of tensors (never modules), atomically."""
    import torch
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
