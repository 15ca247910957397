"""Timing and memory helpers shared by the bench sections."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np


def rate(fn: Callable[[], object], items: int, budget_s: float, min_calls: int = 3, warmup: int = 1) -> dict:
    """Call ``fn`` (which handles ``items`` items) until ``budget_s`` has passed: sustained items/s."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    total = float(np.sum(times))
    return {
        "per_s": items * len(times) / total,
        "best_per_s": items / float(np.min(times)),
        "calls": len(times),
        "items_per_call": items,
    }


def latencies(
    fn: Callable[[object], object], args: list, warmup: int = 2, budget_s: float | None = None, min_n: int = 5
) -> dict:
    """Per-call wall time in ms over ``args`` (one call each): p50, p99, mean. With ``budget_s``, stops
    early once that much time is spent (after at least ``min_n`` calls); ``n_queries`` says how many ran."""
    for a in args[:warmup]:
        fn(a)
    ms = []
    t_end = time.perf_counter() + budget_s if budget_s else None
    for a in args:
        t0 = time.perf_counter()
        fn(a)
        ms.append(1e3 * (time.perf_counter() - t0))
        if t_end is not None and len(ms) >= min_n and time.perf_counter() > t_end:
            break
    return summarize(ms)


def best_threads(fn: Callable[[], object], candidates: list[int], calls: int = 7) -> tuple[int, dict]:
    """The torch thread count (of ``candidates``) with the lowest median time for ``fn``; all medians in ms."""
    import torch

    before = torch.get_num_threads()
    medians = {}
    for n in candidates:
        torch.set_num_threads(n)
        fn()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        medians[n] = float(np.median(ts))
    torch.set_num_threads(before)
    return min(medians, key=medians.get), medians


def summarize(ms: list[float]) -> dict:
    arr = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "n_queries": len(arr),
    }


def rss_bytes(pid: int | None = None, children: bool = False) -> int:
    import psutil

    proc = psutil.Process(pid or os.getpid())
    total = proc.memory_info().rss
    if children:
        for c in proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
    return total


class PeakRSS:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int | None = None, interval: float = 0.02, children: bool = False):
        self.pid, self.interval, self.children = pid, interval, children
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid, self.children))
            except Exception:  # noqa: BLE001 - the process may be gone
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes(self.pid, self.children)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, rss_bytes(self.pid, self.children))
        except Exception:  # noqa: BLE001
            pass


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch sees in one call (matmuls, convolutions, attention): torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
