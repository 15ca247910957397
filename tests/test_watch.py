"""`vlsearch watch`: a real watcher process follows a copy of 500 photos into the folder and their
deletion, and after a restart catches up with what changed while it was down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import FLICKR

pytestmark = pytest.mark.usefixtures("tiny_fast_checkpoint")


def _live(index) -> set[str] | None:
    from vlsearch.errors import IndexError_
    from vlsearch.index.gallery import GalleryIndex

    try:
        idx = GalleryIndex.open(index)
    except IndexError_:
        return None
    try:
        return {r.id for r in idx.all_records()}
    finally:
        idx.close()


def _wait(index, want: set[str], proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while (got := _live(index)) != want:
        assert proc.poll() is None, f"the watcher ended (rc {proc.returncode})"
        assert time.time() < deadline, f"not in sync after {timeout}s: {len(got or ())} of {len(want)}"
        time.sleep(0.25)


def _start(folder, index):
    cmd = [
        sys.executable,
        "-m",
        "vlsearch.cli",
        "watch",
        str(folder),
        "--index",
        str(index),
        "--debounce",
        "0.5",
    ]
    return subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    return out


def test_watch_follows_a_burst_of_500_and_catches_up_after_restart(tmp_path):
    photos = sorted((FLICKR / "Flicker8k_Dataset").iterdir())
    folder, index = tmp_path / "Pictures", tmp_path / "idx"
    folder.mkdir()
    for p in photos[:10]:
        shutil.copy(p, folder / p.name)
    first = {p.name for p in photos[:10]}
    proc = _start(folder, index)
    try:
        _wait(index, first, proc, 120)  # the start-up sync built the index
        burst = folder / "burst"
        copied = set()
        # a burst of 500 files: 100 photos, each in 5 folders (the backbone runs once per content, so
        # the test times the watcher, not feature extraction)
        for n in range(5):
            (burst / f"day{n}").mkdir(parents=True)
            for p in photos[4000:4100]:
                shutil.copy(p, burst / f"day{n}" / p.name)
                copied.add(f"burst/day{n}/{p.name}")
        assert len(copied) == 500
        _wait(index, first | copied, proc, 300)
        shutil.rmtree(burst)
        _wait(index, first, proc, 60)
    finally:
        out = _stop(proc) if proc.poll() is None else proc.communicate()[0]
    syncs = [ln for ln in out.splitlines() if "synced:" in ln]
    assert len(syncs) < 40, out[-3000:]  # debounced: a few syncs for 1,000 events, not one per file
    # changes while no watcher runs are caught up at its start
    (folder / photos[0].name).unlink()
    shutil.copy(photos[20], folder / "new.jpg")
    proc = _start(folder, index)
    try:
        _wait(index, (first - {photos[0].name}) | {"new.jpg"}, proc, 120)
    finally:
        _stop(proc)
