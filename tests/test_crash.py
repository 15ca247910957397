"""Crash safety by fault injection: writers SIGKILLed at every durable step and at random moments.

An add, a delete, a sync and a compaction each run in a forked child (the parent did the model work, so
the child only writes) that is killed either by itself at its N-th durable step (VLSEARCH_FAULT_AT, see
``index.manifest.fault_point``) or by the parent after a random delay. After every kill the index opens
and equals its state before or after the write; re-running the write completes; the next write has
removed what the killed one left behind."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import time

import pytest

pytestmark = pytest.mark.usefixtures("tiny_fast_checkpoint")


def _run_child(fn, fault_at: int | None = None, delay: float | None = None) -> int:
    """Run ``fn`` in a forked child; returns its wait status (killed or exit code)."""
    pid = os.fork()
    if pid == 0:  # the child: write, and die where told
        code = 0
        try:
            from vlsearch.index import manifest

            manifest._steps = 0
            if fault_at:
                os.environ["VLSEARCH_FAULT_AT"] = str(fault_at)
            fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return status


def _leftovers(index) -> list[str]:
    from vlsearch.index.manifest import manifest_of, read_manifest_meta

    meta = read_manifest_meta(index)
    listed = set(manifest_of(meta).segments) if meta.get("layout") == "segments" else set()
    inside = [p.name for p in index.iterdir() if p.name != "config.json" and p.name not in listed]
    beside = [p.name for p in index.parent.iterdir() if p.name.startswith(f".{index.name}.")]
    return inside + [b for b in beside if not b.endswith(".lock")]


@pytest.fixture(scope="module")
def scene(tiny_fast_checkpoint, tmp_path_factory):
    """A folder index with two segments and a tombstone, and each write prepared by the parent."""
    from tests.conftest import FLICKR
    from vlsearch.index.build import add_to_index, build_index, checked_model, embed_new_images, photos_of
    from vlsearch.index.gallery import GalleryIndex
    from vlsearch.index.sync import prepare_sync
    from vlsearch.index.update import remove_ids

    root = tmp_path_factory.mktemp("crash")
    photos = sorted((FLICKR / "Flicker8k_Dataset").iterdir())[5000:5040]
    folder = root / "photos"
    folder.mkdir()
    for p in photos[:24]:
        shutil.copy(p, folder / p.name)
    base = root / "base"
    build_index(base, folder, progress=False)
    extra = root / "extra"
    extra.mkdir()
    for p in photos[24:28]:
        shutil.copy(p, extra / p.name)
    add_to_index(base, extra, progress=False)
    remove_ids(base, [photos[0].name])
    # the folder as the sync will find it: two deleted, three new, one renamed
    for p in photos[1:3]:
        (folder / p.name).unlink()
    for p in photos[30:33]:
        shutil.copy(p, folder / p.name)
    (folder / photos[3].name).rename(folder / "renamed.jpg")
    idx = GalleryIndex.open(base)
    new, emb, _ = embed_new_images(checked_model(idx), [p for p in photos[33:36]], set(), False)
    idx.close()
    _, sync_args = prepare_sync(base, folder, progress=False)
    ids = [photos[5].name, "extra_not_there", photos[25].name]
    return {
        "root": root,
        "base": base,
        "folder": folder,
        "add": lambda ix: _add(ix, new, emb, photos_of(new)),
        "delete": lambda ix: remove_ids(ix, ids),
        "sync": lambda ix: _sync_write(ix, sync_args),
        "compact": lambda ix: _compact(ix),
    }


def _add(ix, new, emb, photos):
    from vlsearch.index.update import add_records

    add_records(ix, new, emb, photos)


def _sync_write(ix, args):
    from vlsearch.index.update import sync_write

    sync_write(ix, *args)


def _compact(ix):
    from vlsearch.index.update import compact

    compact(ix)


def _rerun(scene, op, ix):
    """Re-running the command: the add and the delete as they were; the sync plans again."""
    from vlsearch.index.sync import sync_folder

    if op == "sync":
        sync_folder(ix, scene["folder"], progress=False)
    else:
        scene[op](ix)


def _segments(ix) -> int:
    from vlsearch.index.manifest import manifest_of, read_manifest_meta

    return len(manifest_of(read_manifest_meta(ix)).segments)


OPS = ("add", "delete", "sync", "compact")


def test_kills_at_every_durable_step_and_at_random_moments(scene):
    from vlsearch.index.update import live_state

    root, base = scene["root"], scene["base"]
    before = live_state(base)
    after, took = {}, {}
    for op in OPS:  # each write done once, uninterrupted: its after state and its duration
        ix = root / f"ref-{op}"
        shutil.copytree(base, ix)
        t0 = time.perf_counter()
        assert _run_child(lambda ix=ix, op=op: scene[op](ix)) == 0
        took[op] = time.perf_counter() - t0
        after[op] = live_state(ix)
        assert after[op] != before or op == "compact"
    assert len(after["compact"]) == len(before)
    rng = random.Random(15)
    trials = [(op, n, None) for op in OPS for n in range(1, 40)]  # every step, until one runs through
    kills, done_steps = 0, set()

    def more():  # random moments, round the four writes, until 50 kills in all (at most 200 tries)
        for i in range(200):
            if kills >= 50 and i >= 16:
                return
            op = OPS[i % 4]
            yield op, None, rng.uniform(0, 0.8 * took[op])

    for i, (op, step, delay) in enumerate(itertools.chain(trials, more())):
        if step is not None and op in done_steps:
            continue
        ix = root / f"t{i}"
        shutil.copytree(base, ix)
        status = _run_child(lambda ix=ix, op=op: scene[op](ix), fault_at=step, delay=delay)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (op, step, status)
            if step is not None:
                done_steps.add(op)  # ran past its last durable step
        kills += killed
        state = live_state(ix)  # it opens, and is one of the two states
        assert state in (before, after[op]), (op, step, delay)
        if op == "compact" and killed:
            assert _segments(ix) in (_segments(base), 1)
        _rerun(scene, op, ix)  # re-running completes
        assert live_state(ix) == after[op], (op, step, delay)
        assert not _leftovers(ix), (op, step, _leftovers(ix))  # the re-run cleaned up the killed one
        shutil.rmtree(ix)
    assert done_steps == set(OPS)
    assert kills >= 50, kills
