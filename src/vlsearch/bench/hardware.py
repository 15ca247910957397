"""This machine's physical limits, measured: memory bandwidth and matmul rate (bf16 and fp32).

Every figure of the bench is printed beside the floor these imply: the time to stream the bytes a step
must read at the measured bandwidth, and the time of its FLOPs at the measured matmul rate.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def busy_processes(min_cpu: float = 20.0) -> list[dict]:
    """Other processes using the CPU right now (sampled over 0.5 s): background load to report."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    out = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= min_cpu:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            out.append({"pid": p.pid, "cpu_percent": round(cpu, 1), "cmd": cmd[:120]})
    return sorted(out, key=lambda d: -d["cpu_percent"])


def memory_bandwidth(mb: int = 1024, repeats: int = 5) -> dict:
    """Read and copy bandwidth in GB/s: numpy sum / copy (one thread) and torch sum (all threads)."""
    import torch

    n = mb * 1024 * 1024 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    ta = torch.from_numpy(a)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = a.nbytes
    read_np = nbytes / best(lambda: a.sum()) / 1e9
    copy_np = 2 * nbytes / best(lambda: np.copyto(b, a)) / 1e9
    read_torch = nbytes / best(lambda: ta.sum()) / 1e9
    return {
        "array_mb": mb,
        "read_gbs_numpy_1thread": read_np,
        "copy_gbs_numpy_1thread": copy_np,
        "read_gbs_torch_all_threads": read_torch,
        # the floor uses the best read rate seen: a scan cannot beat it
        "read_gbs": max(read_np, read_torch),
    }


def matmul_tflops(dtype: str = "bf16", n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained square-matmul rate in TFLOP/s on all torch threads."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    for _ in range(2):
        a @ b
    best = float("inf")
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def measure(quick: bool = False) -> dict:
    import torch

    from vlsearch.precision import use_bf16

    return {
        "cpu": cpu_name(),
        # what the models run in on this machine (vlsearch.precision), so the FLOP floors use its rate
        "precision": "bf16" if use_bf16() else "fp32",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": memory_bandwidth(256 if quick else 1024, 3 if quick else 5),
        "matmul_tflops_bf16": matmul_tflops("bf16", 1024 if quick else 2048, 0.5 if quick else 2.0),
        "matmul_tflops_fp32": matmul_tflops("fp32", 1024 if quick else 2048, 0.5 if quick else 2.0),
    }


class Floors:
    """Turns bytes and FLOPs into floor times on this machine."""

    def __init__(self, hw: dict):
        self.read_bps = hw["memory"]["read_gbs"] * 1e9
        self.bf16 = hw["matmul_tflops_bf16"] * 1e12
        self.fp32 = hw["matmul_tflops_fp32"] * 1e12
        self.precision = hw.get("precision", "bf16")

    def scan_ms(self, nbytes: float) -> float:
        return 1e3 * nbytes / self.read_bps

    def flop_ms(self, flops: float, dtype: str | None = None) -> float:
        """FLOPs at the measured matmul rate of ``dtype`` (default: the precision the models run in
        here: on a CPU without native bf16 the models run fp32, and bf16's emulated rate is no floor)."""
        dtype = dtype or self.precision
        return 1e3 * flops / (self.bf16 if dtype == "bf16" else self.fp32)
