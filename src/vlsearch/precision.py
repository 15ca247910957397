"""One switch for reduced precision: bf16 only on CPUs that run it natively.

bf16 autocast is 1.5-3x faster than fp32 where the CPU has bf16 instructions (AVX512-BF16, AMX), but
on a CPU without them (AVX2 only) PyTorch emulates it: a 1024^2 matmul measured 72x slower than fp32.
Everything that would run under bf16 asks here, so one machine runs one precision throughout.
``VLSEARCH_PRECISION=bf16|fp32`` overrides the choice (``auto``, the default, reads the CPU's flags).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform

import torch
from torch import nn

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


def autocast(enabled: bool = True):
    """bf16 autocast where this CPU runs bf16 natively, else a no-op context (fp32)."""
    if enabled and use_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if use_bf16() else torch.float32


def fp32_head(module: nn.Module) -> nn.Module:
    """Marks a pair scorer's scoring head to stay fp32: ``bf16_linears`` leaves it alone and
    ``run_fp32`` runs it outside autocast. A bf16 logit has ~3 significant digits, so a row of 300
    images gets only ~130 distinct scores and ties decide rankings; the head is a few matmuls on one
    vector per pair, so fp32 costs nothing."""
    module.keep_fp32 = True
    return module


def run_fp32(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` in fp32 whatever autocast is in force (the bf16 body's output is upcast first)."""
    with torch.autocast("cpu", enabled=False):
        return head(x.float())


def bf16_linears(module: nn.Module) -> nn.Module:
    """``module`` with every nn.Linear's weights stored in bf16, for inference under bf16 autocast only.

    Autocast would cast the same bf16 weights from fp32 on every call: for one query that copying is a
    third of the time. The results are those of autocast on the fp32 weights, bit for bit. In place: give
    it a copy of a model that is also trained, saved or run without autocast.
    """
    if not use_bf16():  # fp32 machine: autocast is off, so the weights stay fp32
        return module
    keep = {id(sub) for m in module.modules() if getattr(m, "keep_fp32", False) for sub in m.modules()}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in keep:
            m.to(torch.bfloat16)
    return module


def inference_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with bf16 linear weights (``bf16_linears``), for running a model
    that is also trained, saved or run without autocast elsewhere: the original stays as it is."""
    return bf16_linears(copy.deepcopy(module)).eval()
