"""`vlsearch index --sync / --remove / --compact`: the writes of a segmented index (index/update.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def run_segment_command(args, out: Path) -> int:
    from vlsearch.index import update

    if args.compact:
        target = Path(args.compact).expanduser() if isinstance(args.compact, str) else out
        t0 = time.perf_counter()
        res = update.compact(target)
        print(
            f"compacted {target}: {res['segments_before']} segment(s) -> {res['segments_after']}, "
            f"{res['rows_dropped']} deleted row(s) dropped, {res['n_images']} images "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        return 0
    if args.remove:
        removed = update.remove_ids(out, args.remove)
        missing = [i for i in args.remove if i not in removed]
        print(f"removed {len(removed)} image(s) or video(s) from {out}")
        if missing:
            hint = (
                " (a video's moment goes with its video: remove the video's id)"
                if any("@" in i for i in missing)
                else ""
            )
            print(f"not in the index: {', '.join(missing)}{hint}", file=sys.stderr)
        return 0 if removed or not missing else 1
    from vlsearch.index.sync import sync_folder

    plan = sync_folder(out, args.sync, dry_run=args.dry_run, progress=not args.quiet, exclude=args.exclude)
    if args.dry_run:
        for line in plan.lines():
            print(line)
        print(f"plan for {out}: {plan.summary()} (dry run: nothing changed)")
    else:
        print(f"synced {out} with {args.sync}: {plan.summary()}")
    for path, reason in plan.unreadable:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0
