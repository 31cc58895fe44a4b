"""Helpers the bench scripts share: memory readings and a one-line machine description.

Imported as ``_common``: every script runs with ``bench/`` first on ``sys.path``
(``python bench/X.py``, and the workers each script starts with its own ``__file__``).
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

GIB = 2**30


def current_rss() -> int:
    """Resident bytes of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes; None where /proc or the key is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident bytes of this process image (``VmHWM``; ``ru_maxrss`` where /proc is missing,
    which after an exec may still hold the parent's peak)."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def total_ram() -> int:
    """Physical memory of the machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_ram() -> int:
    """Memory the kernel could give a new job now (``MemAvailable``; total RAM where unknown)."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    return avail if avail is not None else total_ram()


def machine() -> str:
    """CPU model, core count and RAM, for the header of a benchmark's report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {total_ram() / GIB:.1f} GiB RAM"
