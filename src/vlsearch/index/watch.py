"""Keep an index in sync with a folder as it changes (``vlsearch watch``), with watchdog.

File events only mark the folder dirty; the work is a sync (index/sync.py) once the folder has been
quiet for ``debounce`` seconds, or at the latest ``max_delay`` seconds after the first event of a burst,
so a copy of thousands of files costs a few syncs, not thousands. Events during a sync cause another
one. The first sync runs at start: what changed while no watcher ran is caught up. Content keys of
files whose size and mtime did not change are reused between syncs (``KeyCache``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vlsearch.index.sync import KeyCache, SyncPlan, sync_folder

log = logging.getLogger("vlsearch.watch")


class FolderWatcher:
    def __init__(
        self,
        folder: str | Path,
        index: str | Path,
        debounce: float = 1.0,
        max_delay: float = 30.0,
        exclude=(),
        on_sync: Callable[[SyncPlan], None] | None = None,
    ):
        self.folder, self.index = Path(folder).resolve(), Path(index).absolute()
        self.debounce, self.max_delay, self.exclude = debounce, max_delay, tuple(exclude)
        self.on_sync = on_sync or (lambda plan: None)
        self.cache = KeyCache()
        self.syncs = 0
        self._first: float | None = None
        self._last = 0.0
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def _ignored(self, path: str) -> bool:
        """Events of the index itself (an index kept inside the folder it watches) and its lock."""
        p = Path(path)
        idx = self.index
        return p == idx or idx in p.parents or p.name.startswith(f".{idx.name}.")

    def notice(self, path: str) -> None:
        if self._ignored(path):
            return
        with self._lock:
            now = time.monotonic()
            self._first = self._first or now
            self._last = now
        self._wake.set()

    def sync(self) -> SyncPlan:
        plan = sync_folder(self.index, self.folder, progress=False, exclude=self.exclude, cache=self.cache)
        self.syncs += 1
        self.on_sync(plan)
        return plan

    def _due(self) -> float | None:
        """Seconds until the pending burst should be synced (0: now), None when nothing is pending."""
        with self._lock:
            if self._first is None:
                return None
            now = time.monotonic()
            return max(0.0, min(self._last + self.debounce - now, self._first + self.max_delay - now))

    def run(self) -> None:
        """Sync now, then on changes, until ``stop``."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                watcher.notice(event.src_path)
                if getattr(event, "dest_path", ""):
                    watcher.notice(event.dest_path)

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=True)
        observer.start()  # before the first sync: nothing that lands during it is missed
        try:
            self.sync()
            while not self.stopped.is_set():
                wait = self._due()
                if wait is None:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if wait > 0:
                    self.stopped.wait(min(wait, 0.5))
                    continue
                with self._lock:
                    self._first = None
                try:
                    self.sync()
                except Exception as e:  # noqa: BLE001 - a bad moment (file half copied): retry on the next event
                    log.warning("sync failed, retrying: %s", e)
                    self.notice(str(self.folder))
        finally:
            observer.stop()
            observer.join(timeout=5)

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()
