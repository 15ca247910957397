"""`vlsearch search`: text-to-image (optionally re-ranked and explained), image-to-image and image-to-text."""

from __future__ import annotations

import json
from pathlib import Path

from vlsearch.commands._common import print_json


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
        "--explain",
        nargs="?",
        const="explain",
        default=None,
        metavar="DIR",
        help="with --rerank: write word-to-region heat maps (JSON + PNG) to DIR",
    )
    p.add_argument(
        "--why", action="store_true", help="show the ImageNet concepts that drove each result (tags)"
    )
    p.add_argument("--json", action="store_true")
    return p


def hit_tags(engine, text, hits) -> list:
    """Concept tags per hit (vlsearch.search.why); [] per hit when the model has no concept channel."""
    from vlsearch.search.why import concept_tags

    keys = [r.key for r in engine.index.records([h.row for h in hits])]
    return concept_tags(engine.embedder, text, keys)


def run(args):
    import vlsearch
    from vlsearch.errors import QueryError

    if (args.query is None) == (args.image is None):
        raise QueryError("give either a text query or --image PATH")
    if args.explain and not args.rerank:
        raise QueryError("--explain needs --rerank K (the Slow model is what explains)")
    engine = vlsearch.load(
        args.index, model=args.model, rerank_model=args.rerank_model if args.rerank else None
    )
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
            print(f"{rank:3d}. {h.score:.3f}  {h.path}")
        if captions.hits:
            print("matching captions:")
            for rank, c in enumerate(captions.hits, 1):
                print(f"{rank:3d}. {c.score:.3f}  {c.text}")
        return 0
    result = engine.search(args.query, args.k, rerank=args.rerank, explain=bool(args.explain))
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
            }
        )
        return 0
    for rank, h in enumerate(result.hits, 1):
        extra = f"  (fast {h.fast_score:.3f}, slow {h.slow_score:.3f})" if h.slow_score is not None else ""
        print(f"{rank:3d}. {h.score:.3f}  {h.path}{extra}")
        if tags is not None:
            print("       " + (", ".join(f"{n} {w:.2f}" for n, w in tags[rank - 1]) or "(no concepts)"))
    print(
        f"({result.timings_ms['total']:.1f} ms: {json.dumps({k: round(v, 1) for k, v in result.timings_ms.items()})})"
    )
    if written:
        print(f"explanations written to {args.explain}/")
    return 0
