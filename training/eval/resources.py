"""Process memory figures for benchmarks: the peak resident set size of one phase of work.

Linux keeps a high-water mark of RSS (``VmHWM``) that writing ``5`` to ``/proc/self/clear_refs``
resets, so each method gets its own peak within one process. Elsewhere the figure falls back to
``ru_maxrss``, the peak since the process started (an upper bound).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; ``False`` where the OS cannot (the peak is then cumulative)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
