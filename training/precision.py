"""bf16 autocast on CPUs that compute bf16 natively.

A CPU with AMX-BF16 runs bf16 matrix products many times faster than fp32; without native bf16
PyTorch emulates it and autocast only costs time. AVX512-BF16 alone is not enough: on a Xeon with
``avx512_bf16`` and no AMX (2026-12-02, SmolLM2-135M, one thread) autocast made a lone answer 2.5x
slower (prefill 1.1 s instead of 0.7 s for 220 tokens: autocast casts the fp32 weights at every
product) although an 8-row decoding step got 20 % faster (docs/BENCHMARKS.md). So ``auto`` turns
autocast on only where the CPU has AMX, ``on`` forces it, ``off`` never; CUDA answers in bf16
through the model's dtype as before (``training.models``), not through autocast.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path
from typing import Literal

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AUTO_FLAG = "amx_bf16"
"""The flag ``auto`` needs: AVX512-BF16 alone was measured slower than fp32 (module docstring)."""
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
    """Whether generation on ``device`` runs under bf16 autocast: ``auto`` = a CPU with AMX-BF16
    (``cpu_bf16_flags``) and a PyTorch that can use it (``torch.backends.mkldnn``)."""
    if torch.device(device).type != "cpu" or mode == "off":
        return False
    if mode == "on":
        return True
    return AUTO_FLAG in cpu_bf16_flags() and torch.backends.mkldnn.is_available()


def autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast`` to bf16 on a CPU when ``enabled``, else a no-op context."""
    if not enabled or torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)
