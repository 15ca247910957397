"""`vlsearch watch FOLDER --index INDEX`: keep an index in sync with a folder as files come and go."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path


def register(sub):
    p = sub.add_parser("watch", help="keep an index in sync with a folder (adds, edits, moves, deletes)")
    p.add_argument("folder", help="the folder of photos to follow")
    p.add_argument("--index", default=None, help="index folder (default: ~/.cache/vlsearch/indexes/default)")
    p.add_argument("--debounce", type=float, default=1.0, help="seconds of quiet before a sync (default: 1)")
    p.add_argument(
        "--max-delay",
        type=float,
        default=30.0,
        help="sync at the latest this many seconds into a long burst of changes (default: 30)",
    )
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="files to leave out")
    return p


def run(args):
    from vlsearch.errors import DataError
    from vlsearch.index.watch import FolderWatcher
    from vlsearch.settings import default_index_dir

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"no such folder: {folder}")
    index = Path(args.index).expanduser() if args.index else default_index_dir()

    def report(plan):
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {'synced' if plan else 'in sync'}: {plan.summary()}", flush=True)
        for path, reason in plan.unreadable:
            print(f"[{stamp}] skipped {path}: {reason}", file=sys.stderr, flush=True)

    watcher = FolderWatcher(folder, index, args.debounce, args.max_delay, args.exclude, on_sync=report)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    print(f"watching {folder} for {index} (Ctrl-C stops)", flush=True)
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.stop()
    return 0
