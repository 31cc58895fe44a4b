"""Run a media loader on one file in a fresh Python process and measure its peak-RSS growth
(the decompression-bomb / huge-WAV tests: the bound must hold before anything is decoded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def load_in_fresh_process(module: str, function: str, path: Path, *args: object) -> tuple[str, str, int]:
    """``(error class name or "", its reason, MiB of peak-RSS growth)`` of ``module.function(path, *args)``."""
    call = ", ".join([repr(str(path)), *map(repr, args)])
    code = (
        "import resource\n"
        f"from {module} import {function}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "error = ['-', '-']\n"
        "try:\n"
        f"    {function}({call})\n"
        "except Exception as e:\n"
        "    error = [type(e).__name__, str(getattr(e, 'reason', '')) or '-']\n"
        "print(*error, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    return out[0], out[1], int(out[2])
