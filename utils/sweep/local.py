"""The local executor: N slots on this machine, each run a ``python main.py`` process with its output in
LOG_DIR/<run id>.out. With several slots each run gets one thread (on 2 CPU cores two one-thread runs give ~1.3x
the throughput of one run on both); where GPUs are found each slot gets one (CUDA_VISIBLE_DEVICES)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

from utils.sweep.command import MAIN
from utils.sweep.plan import Step, console_log


def find_gpus(option: Optional[str] = None) -> list[str]:
    """The GPUs slots are given: ``option`` ("0,1", or "none"), else CUDA_VISIBLE_DEVICES, else nvidia-smi's list."""
    if option is not None:
        return [] if option.strip().lower() in ("", "none") else [g.strip() for g in option.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(row for row in listing.splitlines() if row.startswith("GPU "))]


def slot_env(slot: int, jobs: int, gpus: list[str], base: Optional[dict] = None) -> dict[str, str]:
    """The environment of the run in ``slot``: one thread each when several run at once, the slot's GPU."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    if jobs > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


@dataclass
class Child:
    proc: subprocess.Popen
    slot: int
    log: IO
    tee: Optional[threading.Thread] = None


@dataclass
class LocalLauncher:
    """Runs main.py processes in ``slots`` slots; with one slot their output is also shown (as run.sh's tee)."""
    slots: int
    python: str
    log_dir: Path
    gpus: list[str] = field(default_factory=list)
    wait_s: float = 2.0
    show: bool = False
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, launches: list[tuple[Step, list[str]]]) -> None:
        for step, args in launches:
            slot = min(set(range(self.slots)) - {c.slot for c in self.children.values()})
            log = open(console_log(self.log_dir, step.run), "a")
            proc = subprocess.Popen([self.python, str(MAIN), *args], stdout=subprocess.PIPE if self.show else log,
                                    stderr=subprocess.STDOUT, env=slot_env(slot, self.slots, self.gpus), text=True)
            child = Child(proc, slot, log)
            if self.show:
                child.tee = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
                child.tee.start()
            self.children[step.run.id] = child

    def poll(self) -> dict[str, int]:
        ended = {}
        for rid, child in list(self.children.items()):
            code = child.proc.poll()
            if code is not None:
                if child.tee:
                    child.tee.join()
                child.log.close()
                del self.children[rid]
                ended[rid] = code
        return ended

    def active(self) -> frozenset[str]:
        return frozenset(self.children)

    def wait(self, seconds: float) -> None:
        """Until one of the runs ends, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and all(c.proc.poll() is None for c in self.children.values()):
            time.sleep(0.05)

    def stop(self, signum: int) -> None:
        """Pass the signal on (Ctrl-C from a terminal reached them already), wait for the runs to save and exit."""
        time.sleep(1)
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signum)
        deadline = time.monotonic() + 120
        for child in self.children.values():
            try:
                child.proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                child.proc.kill()
        self.poll()


def _tee(stream: IO, log: IO) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        sys.stdout.write(line)
        sys.stdout.flush()

