"""`vlsearch search`: text-to-image (optionally re-ranked and explained), image-to-image and image-to-text."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlsearch.commands._common import print_json
from vlsearch.errors import QueryError

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.


def register(sub):
    p = sub.add_parser("search", help="search an index by text (or by --image)")
    p.add_argument("query", nargs="?", default=None, help="the text query")
    p.add_argument(
        "--image", default=None, help="search by this image instead: similar images and matching captions"
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index", default=None, help="index folder (default: the one `vlsearch demo` built)")
    p.add_argument("--model", default=None, help="dual encoder (default: the one the index was built with)")
    p.add_argument(
        "--rerank", type=int, default=0, metavar="K", help="re-rank the Fast top-K with the Slow model"
    )
    p.add_argument("--rerank-model", default="slow", help="pair scorer for --rerank (default: slow)")
    p.add_argument(
        "--rerank-features",
        choices=["full", "compact"],
        default="full",
        help="with --rerank: read the full maps, or compact int8 parts (~41 KB per image, stored on first use)",
    )
    p.add_argument(
        "--explain",
        nargs="?",
        const="explain",
        default=None,
        metavar="DIR",
        help="with --rerank: write word-to-region heat maps (JSON + PNG) to DIR",
    )
    add_filter_args(p)
    p.add_argument("--videos", action="store_true", help="videos only, each with its best moment")
    p.add_argument("--moments", action="store_true", help="rank moments across all videos (with --image too)")
    p.add_argument(
        "--aggregate", default=None, choices=["max", "topn"], help="with --videos: moment aggregation"
    )
    p.add_argument("--video", default=None, metavar="ID", help="video-to-text: captions matching this video")
    p.add_argument(
        "--why", action="store_true", help="show the ImageNet concepts that drove each result (tags)"
    )
    p.add_argument("--json", action="store_true")
    return p


def add_filter_args(p) -> None:
    g = p.add_argument_group("filters, sort and paging (text search)")
    g.add_argument(
        "--after", default=None, metavar="DATE", help="taken on or after DATE (2021, 2021-07, 2021-07-04)"
    )
    g.add_argument("--before", default=None, metavar="DATE", help="taken before the end of DATE")
    g.add_argument(
        "--folder",
        default=None,
        metavar="PREFIX",
        help="in this folder (relative to the one indexed) or below",
    )
    g.add_argument("--camera", default=None, metavar="TEXT", help="camera make or model contains TEXT")
    g.add_argument("--near", default=None, metavar="LAT,LON,KM", help="taken within KM of LAT,LON (GPS)")
    g.add_argument("--sort", default="score", choices=["score", "date"], help="by relevance or newest first")
    g.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    g.add_argument("--cursor", default=None, help="the next_cursor a previous --json search printed")
    g.add_argument("--min-score", type=float, default=None, help="drop results below this cosine")


def filter_kwargs(args) -> dict:
    return {
        "after": args.after,
        "before": args.before,
        "folder": args.folder,
        "camera": args.camera,
        "near": args.near,
        "sort": args.sort,
        "offset": args.offset,
        "cursor": args.cursor,
        "min_score": args.min_score,
    }


def fmt_time(t: float) -> str:
    t = max(0.0, float(t))
    m, s = divmod(int(t), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def hit_text(h) -> str:
    """`path` for a photo, `path @ 0:12-0:15` for a video's moment."""
    if getattr(h, "kind", "image") == "video":
        return f"{h.path} @ {fmt_time(h.t_start)}-{fmt_time(h.t_end)}"
    return h.path


def hit_tags(engine, text, hits) -> list:
    """Concept tags per hit (vlsearch.search.why); [] per hit when the model has no concept channel."""
    from vlsearch.search.why import concept_tags

    keys = [r.key for r in engine.index.records([h.row for h in hits])]
    return concept_tags(engine.embedder, text, keys)


def run(args):
    import vlsearch

    if args.video is not None:
        return _video_to_text(args)
    if (args.query is None) == (args.image is None):
        raise QueryError("give either a text query or --image PATH")
    if args.explain and not args.rerank:
        raise QueryError("--explain needs --rerank K (the Slow model is what explains)")
    engine = vlsearch.load(
        args.index,
        model=args.model,
        rerank_model=args.rerank_model if args.rerank else None,
        rerank_compact=bool(args.rerank) and args.rerank_features == "compact",
    )
    if args.videos or args.moments:
        return _video_search(engine, args)
    if args.image:
        if not Path(args.image).is_file():
            raise QueryError(f"no such image file: {args.image}")
        images = engine.search_image(args.image, args.k)
        captions = engine.captions_for_image(args.image, min(args.k, 10))
        if args.json:
            print_json(
                {
                    "images": [h.to_dict() for h in images.hits],
                    "captions": [vars(c) for c in captions.hits],
                    "timings_ms": images.timings_ms,
                }
            )
            return 0
        print("similar images:")
        for rank, h in enumerate(images.hits, 1):
            print(f"{rank:3d}. {h.score:.3f}  {hit_text(h)}")
        if captions.hits:
            print("matching captions:")
            for rank, c in enumerate(captions.hits, 1):
                print(f"{rank:3d}. {c.score:.3f}  {c.text}")
        return 0
    result = engine.search(
        args.query, args.k, rerank=args.rerank, explain=bool(args.explain), **filter_kwargs(args)
    )
    tags = hit_tags(engine, args.query, result.hits) if args.why else None
    written = []
    if args.explain and result.explanations:
        from vlsearch.search.explain import write_explanations

        written = write_explanations(Path(args.explain), result.hits, result.explanations)
    if args.json:
        print_json(
            {
                "query": args.query,
                "results": [
                    {**h.to_dict(), **({"concepts": tags[i]} if tags is not None else {})}
                    for i, h in enumerate(result.hits)
                ],
                "timings_ms": result.timings_ms,
                "explanations": [str(p) for p in written],
                "n_matching": result.n_matching,
                "next_offset": result.next_offset,
                "next_cursor": result.next_cursor,
            }
        )
        return 0
    for rank, h in enumerate(result.hits, result.offset + 1):
        extra = f"  (fast {h.fast_score:.3f}, slow {h.slow_score:.3f})" if h.slow_score is not None else ""
        when = time.strftime("  %Y-%m-%d", time.gmtime(h.taken)) if h.taken is not None else ""
        print(f"{rank:3d}. {h.score:.3f}  {hit_text(h)}{when}{extra}")
        if tags is not None:
            print("       " + (", ".join(f"{n} {w:.2f}" for n, w in tags[rank - 1]) or "(no concepts)"))
    if result.next_offset is not None:
        print(f"(more: --offset {result.next_offset})")
    print(
        f"({result.timings_ms['total']:.1f} ms: {json.dumps({k: round(v, 1) for k, v in result.timings_ms.items()})})"
    )
    if written:
        print(f"explanations written to {args.explain}/")
    return 0


def _video_search(engine, args):

    query = args.image if args.image else args.query
    if args.image and not Path(args.image).is_file():
        raise QueryError(f"no such image file: {args.image}")
    if args.moments:
        result = engine.search_moments(query, args.k, by_image=bool(args.image))
    else:
        if args.image and args.rerank:
            raise QueryError("--rerank needs a text query")
        result = engine.search_videos(
            args.image and Path(args.image) or query, args.k, rerank=args.rerank, aggregate=args.aggregate
        )
    if args.json:
        print_json(
            {"query": query, "results": [h.to_dict() for h in result.hits], "timings_ms": result.timings_ms}
        )
        return 0
    for rank, h in enumerate(result.hits, 1):
        extra = f"  (fast {h.fast_score:.3f}, slow {h.slow_score:.3f})" if h.slow_score is not None else ""
        print(f"{rank:3d}. {h.score:.3f}  {hit_text(h)}{extra}")
    if not result.hits:
        print("(no videos in this index)")
    return 0


def _video_to_text(args):
    import vlsearch

    engine = vlsearch.load(args.index, model=args.model)
    result = engine.captions_for_video(args.video, args.k)
    if args.json:
        print_json({"video": args.video, "captions": [vars(c) for c in result.hits]})
        return 0
    for rank, c in enumerate(result.hits, 1):
        print(f"{rank:3d}. {c.score:.3f}  {c.text}")
    if not result.hits:
        print("(this index has no captions)")
    return 0
