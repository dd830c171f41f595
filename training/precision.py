"""bf16 autocast on CPUs that compute bf16 natively.

A CPU with AVX512-BF16 or AMX-BF16 runs bf16 matrix products at up to twice (AVX512) or many
times (AMX) the fp32 rate; without them PyTorch emulates bf16 and autocast only costs time. So
the service turns autocast on for a CPU only where the hardware has it (``detect``), with a
setting to force it off; CUDA answers in bf16 through the model's dtype as before
(``training.models``), not through autocast.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path
from typing import Literal

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
Bf16Mode = Literal["auto", "on", "off"]


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 feature flags this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def cpu_bf16_enabled(mode: Bf16Mode, device: torch.device | str) -> bool:
    """Whether generation on ``device`` runs under bf16 autocast: ``auto`` = a CPU with native bf16
    (``cpu_bf16_flags``) and a PyTorch that can use it (``torch.backends.mkldnn``)."""
    if torch.device(device).type != "cpu" or mode == "off":
        return False
    if mode == "on":
        return True
    return bool(cpu_bf16_flags()) and torch.backends.mkldnn.is_available()


def autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast`` to bf16 on a CPU when ``enabled``, else a no-op context."""
    if not enabled or torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)
