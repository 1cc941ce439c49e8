"""The peak memory of one stretch of work (a task): on a GPU the CUDA allocator's peak, on the CPU the process's
resident-set high-water mark (Linux's VmHWM), each reset when the stretch starts so that the figure is its own.

Where the CPU's high-water mark cannot be reset (no /proc, or /proc/self/clear_refs refused), the peak is not
measured (None) and the reason is logged once: a lifetime peak is never recorded as a task's.

On the CPU a stretch starts by handing the memory freed so far back to the system (glibc's malloc_trim): the
temporaries of a training step change size with every task (the frozen stack grows), so glibc's heap keeps freed
holes it cannot reuse, and without the trim the process's resident set crept up by about 2 MB a task (measured on
benchmarks/long_stream.py's default: the peak at task 50 was 1.14x task 10's without it, 1.05x with it).
"""
from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("cl")

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 2 ** 20


def rss_high_water_kb(status: Path = STATUS) -> int:
    """This process's resident-set high-water mark (VmHWM, kB) since it started or since the last reset."""
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status.read_text(), re.M)
    if m is None:
        raise OSError(f"'{status}' has no VmHWM line")
    return int(m.group(1))


def heap_trimmer() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim (None where the C library has none: another allocator, which keeps its own policy)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def reset_rss_high_water(clear_refs: Path = CLEAR_REFS) -> None:
    """Set VmHWM back to the current resident set (Linux >= 4.0: "5" written to /proc/self/clear_refs)."""
    with open(clear_refs, "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of a device between ``reset`` and ``read_mb``: CUDA's max_memory_allocated on a GPU, the RSS
    high-water mark on the CPU (what the process held, libraries and data included)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.unavailable: Optional[str] = None  # why the peak is not measured here (None: it is)
        self.trim = heap_trimmer() if device.type == "cpu" else None
        if device.type not in ("cuda", "cpu"):
            self.unavailable = f"no peak-memory measure for device type '{device.type}'"
        elif device.type == "cpu" and self.trim is None:
            log.info("the C library has no malloc_trim: memory freed in a task stays with its allocator")

    def reset(self) -> None:
        """Start a new stretch: the peak from here on (on the CPU, from what the process holds once the memory
        freed so far is handed back)."""
        if self.trim is not None:
            self.trim(0)
        if self.unavailable:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            reset_rss_high_water()
            rss_high_water_kb()
        except OSError as e:
            self.unavailable = (f"the resident-set high-water mark cannot be reset here ({e}); peak_memory_mb is "
                                "recorded as null")
            log.warning(f"peak memory per task: {self.unavailable}")

    def read_mb(self) -> Optional[float]:
        """The peak since ``reset`` in MiB (None where it is not measured)."""
        if self.unavailable:
            return None
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
        return round(rss_high_water_kb() * 1024 / MB, 1)
