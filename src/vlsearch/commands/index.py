"""`vlsearch index`: embed a gallery (a dataset split or any image folder) into a searchable index."""

from __future__ import annotations

import sys
from pathlib import Path

from vlsearch.commands._common import add_model_arg, add_quiet
from vlsearch.settings import VECTOR_INDEX_KINDS, default_index_dir

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.


def register(sub):
    p = sub.add_parser("index", help="build an index over a dataset split or a folder of images")
    p.add_argument(
        "source", nargs="?", default=None, help="dataset root or image folder (default: the data root)"
    )
    p.add_argument("--split", default="dev", help="dataset split when SOURCE is a dataset (default: dev)")
    add_model_arg(p)
    p.add_argument("--out", default=None, help="index folder (default: ~/.cache/vlsearch/indexes/default)")
    p.add_argument("--kind", default="auto", choices=["auto", *VECTOR_INDEX_KINDS], help="vector index type")
    p.add_argument(
        "--add", metavar="FOLDER", default=None, help="add the images of FOLDER to the existing index --out"
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="compute features with Ray (local cluster, or ADDRESS)",
    )
    p.add_argument("--shards", type=int, default=None, help="with --ray: number of index shards")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files matching GLOB (relative path, name or folder; repeatable)",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="also index symlinks whose target lies outside the folder (the service will serve those files)",
    )
    p.add_argument(
        "--no-concepts",
        action="store_true",
        help="leave the model's ImageNet concept channel out (smaller vectors, less work per query)",
    )
    p.add_argument(
        "--no-hubness",
        action="store_true",
        help="leave the model's hubness prior out (it lowers images that match every caption; it helped "
        "Flickr8k dev and cost a little on coco-mini: docs/hubness.md)",
    )
    p.add_argument(
        "--sync",
        metavar="FOLDER",
        default=None,
        help="make the index --out match FOLDER: add new files, re-embed changed ones, remove deleted ones",
    )
    p.add_argument("--dry-run", action="store_true", help="with --sync: print the plan, change nothing")
    p.add_argument(
        "--remove", nargs="+", metavar="ID", default=None, help="delete these image ids from --out"
    )
    p.add_argument(
        "--compact",
        nargs="?",
        const=True,
        default=None,
        metavar="INDEX",
        help="merge the segments of INDEX (or --out) and drop deleted rows",
    )
    add_quiet(p)
    return p


def run(args):

    out = Path(args.out).expanduser() if args.out else default_index_dir()
    if args.sync or args.remove or args.compact:
        from vlsearch.commands._segments import run_segment_command

        return run_segment_command(args, out)
    if args.add:
        from vlsearch.index.build import add_to_index

        n, report = add_to_index(out, args.add, progress=not args.quiet, exclude=args.exclude)
        if report:
            print(report.summary(), file=sys.stderr)
        print(f"added {n} image(s) to {out}")
        return 0
    if args.ray:
        from vlsearch.index.distributed import build_index_ray

        path = build_index_ray(
            out,
            args.source,
            args.split,
            args.model,
            address=args.ray,
            shards=args.shards,
            progress=not args.quiet,
        )
        print(f"wrote sharded index to {path}")
        return 0
    from vlsearch.index.build import build_index
    from vlsearch.index.gallery import GalleryIndex

    path, report = build_index(
        out,
        args.source,
        args.split,
        args.model,
        args.kind,
        progress=not args.quiet,
        exclude=args.exclude,
        concepts=not args.no_concepts,
        follow_symlinks=args.follow_symlinks,
        hubness=not args.no_hubness,
    )
    idx = GalleryIndex.open(path)
    print(
        f"wrote {idx.config.kind} index of {idx.config.n_images} images ({idx.config.n_captions} captions) to {path}"
    )
    if report:
        print(f"{len(report.skipped)} unreadable image(s) skipped (listed above)")
    return 0
