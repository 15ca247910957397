"""`vlsearch eval`: Recall@1/5/10 in both directions (and RSUM) on a dataset split."""

from __future__ import annotations

from vlsearch.commands._common import add_data_args, add_model_arg, add_quiet, fmt_metrics, print_json
from vlsearch.errors import QueryError
from vlsearch.settings import VECTOR_INDEX_KINDS

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.


def register(sub):
    p = sub.add_parser("eval", help="measure retrieval recall on a dataset split")
    add_data_args(p)
    add_model_arg(p)
    p.add_argument("--images", type=int, default=None, help="evaluate on a seeded random subset of N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerank", type=int, default=0, help="re-rank the Fast top-K with a pair scorer")
    p.add_argument("--rerank-model", default=None, help="pair scorer for --rerank (default: slow)")
    p.add_argument(
        "--rerank-features",
        choices=["full", "compact"],
        default="full",
        help="what the re-ranker reads: the full maps, or a compact store's int8 parts (~41 KB per image)",
    )
    p.add_argument(
        "--index",
        default="flat",
        choices=[*VECTOR_INDEX_KINDS, "auto"],
        help="also measure an approximate index",
    )
    p.add_argument(
        "--aggregate",
        default=None,
        choices=["max", "topn"],
        help="video datasets: how a video's score aggregates its moments' (default: max)",
    )
    p.add_argument(
        "--queries",
        type=int,
        default=None,
        help="video datasets with --rerank: a seeded sample of N captions",
    )
    p.add_argument(
        "--suite",
        action="store_true",
        help="Flickr8k dev and coco-mini side by side, concept channel on and off",
    )
    p.add_argument(
        "--gallery",
        action="append",
        default=[],
        metavar="PATH[:SPLIT]",
        help="with --suite: also this COCO/Karpathy/Flickr-layout folder (repeatable)",
    )
    p.add_argument(
        "--no-concepts",
        action="store_true",
        help="switch the model's concept channel off (as the index flag)",
    )
    p.add_argument(
        "--no-hubness",
        action="store_true",
        help="switch the model's hubness prior off (scores as before the prior; models/hubness.py)",
    )
    p.add_argument(
        "--live-queries",
        action="store_true",
        help="embed each caption as a live query (raw text through the query runtime, one at a time)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_quiet(p)
    return p


def run(args):
    from vlsearch.eval.evaluate import evaluate

    if args.data_root:
        from pathlib import Path

        from vlsearch.data.video_dataset import find_caption_json

        if find_caption_json(Path(args.data_root)) is not None:
            return _run_video(args)

    if args.images is not None and args.images < 1:
        raise QueryError("--images must be at least 1")
    if args.suite:
        return run_suite_command(args)
    result = evaluate(
        args.data_root,
        args.split,
        args.model,
        images=args.images,
        seed=args.seed,
        rerank=args.rerank,
        rerank_model=args.rerank_model,
        index_kind=args.index,
        progress=not (args.quiet or args.json),
        concepts=not args.no_concepts,
        hubness=not args.no_hubness,
        rerank_features=args.rerank_features,
        live_queries=args.live_queries,
    )
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['model']} on {result['dataset']}:{result['split']} ({result['n_images']} images, {result['n_captions']} captions)"
        )
        print(fmt_metrics(result))
        if "query_path" in result:
            print(f"  live queries: {result['query_path']['runtime']}, {result['query_path']['precision']}")
        for k, v in result["cost"].items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
        if "ann_recall_at_10_vs_exact" in result:
            print(f"  {result['index']} recall@10 vs exact: {result['ann_recall_at_10_vs_exact']:.3f}")
    return 0


def _run_video(args):
    from vlsearch.eval.video import evaluate_video
    from vlsearch.search.video import DEFAULT_AGGREGATE

    result = evaluate_video(
        args.data_root,
        args.model,
        rerank=args.rerank,
        rerank_model=args.rerank_model,
        aggregate=args.aggregate or DEFAULT_AGGREGATE,
        progress=not (args.quiet or args.json),
        rerank_queries=args.queries,
    )
    if args.json:
        print_json(result)
        return 0
    print(
        f"{result['model']} on {result['dataset']} ({result['n_videos']} videos, {result['n_captions']} captions)"
    )
    for how, m in result["aggregates"].items():
        t, v = m["t2v"], m["v2t"]
        print(
            f"  {how:5s} text->video R@1 {t['r1']:.1f} R@5 {t['r5']:.1f} R@10 {t['r10']:.1f} | "
            f"video->text R@1 {v['r1']:.1f} R@5 {v['r5']:.1f} R@10 {v['r10']:.1f}"
        )
    if "moments" in result:
        m = result["moments"]
        print(f"  moments R@1 IoU>=0.5 {m['r1_iou50']:.1f}  IoU>=0.7 {m['r1_iou70']:.1f}")
    if "rerank" in result:
        r = result["rerank"]["t2v"]
        print(
            f"  + Slow K={result['rerank']['K']}: text->video R@1 {r['r1']:.1f} R@5 {r['r5']:.1f} R@10 {r['r10']:.1f}"
        )
    return 0


def run_suite_command(args):
    from vlsearch.eval.suite import run_suite, suite_table

    result = run_suite(
        args.model, args.data_root, args.gallery, images=args.images, hubness=not args.no_hubness
    )
    if args.json:
        print_json(result)
    else:
        print(f"{result['model']}: Flickr8k dev beside other galleries (concepts on and off, one run)")
        print(suite_table(result))
    return 0
