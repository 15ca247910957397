"""`vlsearch bench`: throughput, latency, recall and memory on this machine, beside peers and floors."""

from __future__ import annotations

import sys

from vlsearch.errors import VLSearchError

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.


def register(sub):
    p = sub.add_parser(
        "bench",
        help="benchmark encoders, re-rankers and query latency against peers (JSON + PNG + table)",
    )
    p.add_argument("--quick", action="store_true", help="small galleries, few iterations (about a minute)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.png, bench.md")
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset whose photos and captions are used (default: the data root)",
    )
    p.add_argument("--model", default="fast", help="dual encoder (default: fast)")
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated gallery sizes (default: 1000,10000,100000,1000000; --quick: 500,2000)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="threads for torch and faiss (default: all cores)"
    )
    p.add_argument("--no-serve", action="store_true", help="skip starting `vlsearch serve` for its memory")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def run(args):
    from vlsearch.bench import run_bench

    sizes = None
    if args.sizes:
        try:
            sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
        except ValueError as e:
            raise VLSearchError(f"--sizes must be comma-separated whole numbers, not {args.sizes!r}") from e
        if not sizes or min(sizes) < 1:
            raise VLSearchError("--sizes needs at least one positive gallery size")
    result = run_bench(
        args.out,
        quick=args.quick,
        data_root=args.data_root,
        model=args.model,
        sizes=sizes,
        threads=args.threads,
        serve=not args.no_serve,
        progress=not args.quiet,
    )
    sys.stdout.write(result["table"])
    print(f"\nwrote {args.out}/bench.json, {result['plot']} and {args.out}/bench.md")
    return 0
