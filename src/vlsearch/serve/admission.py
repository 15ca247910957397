"""Admission control for model work: a deadline-ordered thread pool (Scheduler) behind bounded
admission counters (ModelPool), so an overloaded service answers 503 at once instead of piling up work.
Request-body bytes in flight are bounded earlier, in :class:`~vlsearch.serve.gate.Gate`."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from concurrent.futures import Future

from vlsearch.serve.errors import Busy


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class Scheduler:
    """``workers`` threads running jobs by deadline: a job's deadline is its arrival time, plus
    ``heavy_delay`` seconds for heavy work, so Fast queries overtake Slow re-ranks that arrived less
    than ``heavy_delay`` before them (re-ranks still never starve). Unbounded: ModelPool bounds it."""

    def __init__(self, workers: int, threads_per_worker: int, heavy_delay: float = 0.5):
        self.heavy_delay = heavy_delay
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._work, args=(threads_per_worker,), name=f"vlsearch-model-{i}", daemon=True
            )
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn, heavy: bool = False) -> Future:
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the model pool is shut down")
            deadline = time.monotonic() + (self.heavy_delay if heavy else 0.0)
            heapq.heappush(self._heap, (deadline, next(self._order), future, fn))
            self._cv.notify()
        return future

    def _work(self, threads: int) -> None:
        _init_worker(threads)
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, future, fn = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while waiting: its caller went away
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(e)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, future, _ in self._heap:
                future.cancel()
            self._heap.clear()
            self._cv.notify_all()


class ModelPool:
    """``workers`` threads for model work behind an admission counter of ``workers + max_queue``, and a
    second one for heavy work (Slow re-ranking, adding images) of ``workers + max_heavy_queue``, so a
    queue full of re-ranks cannot make every admitted request wait for seconds; and Fast work goes
    first when both wait (see Scheduler).

    The counters are only touched on the event loop thread. A slot is released when the work is really
    done (or cancelled before it started), not when the waiting request goes away, so clients that hang
    up cannot make the pool take on more than its capacity.
    """

    def __init__(self, workers: int, threads_per_worker: int, max_queue: int, max_heavy_queue: int = 8):
        self.workers = max(1, workers)
        self.capacity = self.workers + max(0, max_queue)
        self.heavy_capacity = min(self.capacity, self.workers + max(0, max_heavy_queue))
        self.threads_per_worker = threads_per_worker
        self.executor = Scheduler(self.workers, threads_per_worker)
        self.pending = 0
        self.heavy_pending = 0
        self.peak = 0
        self.served = 0
        self.shed = 0

    async def run(self, fn, *args, heavy: bool = False):
        if self.full(heavy):
            self.shed += 1
            raise Busy()
        loop = asyncio.get_running_loop()
        self.pending += 1
        self.heavy_pending += heavy
        self.peak = max(self.peak, self.pending)
        queued = time.perf_counter()

        def job():
            started = time.perf_counter()
            return fn(*args), (started - queued) * 1e3

        try:
            cf = self.executor.submit(job, heavy)
        except BaseException:
            self._release(heavy)
            raise
        cf.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._release, heavy))
        return await asyncio.wrap_future(cf)

    def start(self) -> None:
        if self.executor._closed:
            self.executor = Scheduler(self.workers, self.threads_per_worker)

    def full(self, heavy: bool = False) -> bool:
        return self.pending >= self.capacity or (heavy and self.heavy_pending >= self.heavy_capacity)

    def _release(self, heavy: bool) -> None:
        self.pending -= 1
        self.heavy_pending -= heavy
        self.served += 1

    def stats(self) -> dict:
        return {
            "workers": self.workers,
            "capacity": self.capacity,
            "in_flight": self.pending,
            "heavy_capacity": self.heavy_capacity,
            "heavy_in_flight": self.heavy_pending,
            "peak_in_flight": self.peak,
            "served": self.served,
            "shed": self.shed,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()
