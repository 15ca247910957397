"""One switch for reduced precision: bf16 only on CPUs that run it natively.

bf16 autocast is 1.5-3x faster than fp32 where the CPU has bf16 instructions (AVX512-BF16, AMX), but
on a CPU without them (AVX2 only) PyTorch emulates it: a 1024^2 matmul measured 72x slower than fp32.
Everything that would run under bf16 asks here, so one machine runs one precision throughout.
``VLSEARCH_PRECISION=bf16|fp32`` overrides the choice (``auto``, the default, reads the CPU's flags).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; ARM reports "bf16" in its Features line


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    words = set(text.split())
    if any(flag in words for flag in BF16_FLAGS):
        return True
    return platform.machine().lower() in ("aarch64", "arm64") and "bf16" in words


def use_bf16() -> bool:
    """True when models here run under bf16 autocast (and inference copies hold bf16 linear weights)."""
    choice = os.environ.get("VLSEARCH_PRECISION", "auto").strip().lower()
    if choice == "bf16":
        return True
    if choice == "fp32":
        return False
    return cpu_has_native_bf16()


def precision_name(enabled: bool = True) -> str:
    return "bf16" if enabled and use_bf16() else "fp32"


def autocast(enabled: bool = True):
    """bf16 autocast where this CPU runs bf16 natively, else a no-op context (fp32)."""
    if enabled and use_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if use_bf16() else torch.float32
