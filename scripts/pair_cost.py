#!/usr/bin/env python
"""One text against K images through a pair scorer, as the re-ranker calls it: text state, image states
from backbone maps (keys/values computed, not cached), scores. Prints the p50 ms and pairs/s.

To compare against an older version of the code, run the same script on that checkout's sources:

    git worktree add /tmp/vlsearch-old 17d255c
    PYTHONPATH=/tmp/vlsearch-old/src .venv/bin/python scripts/pair_cost.py --k 50
    PYTHONPATH=src .venv/bin/python scripts/pair_cost.py --k 50

``VLSEARCH_MALLOC=default`` leaves glibc's allocator as it is (settings.keep_freed_memory).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="slow", help="pair-scorer checkpoint or name")
    p.add_argument("--k", type=int, default=50, help="images per call")
    p.add_argument("--tokens", type=int, default=12, help="query length in word pieces")
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args(argv)

    from vlsearch.settings import configure_torch

    configure_torch()
    import numpy as np
    import torch

    from vlsearch.models.registry import load_model
    from vlsearch.precision import autocast, inference_copy

    model = inference_copy(load_model(args.model)[0])
    c = model.config
    g = torch.Generator().manual_seed(0)
    mid = torch.randn(args.k, c.mid_side**2, c.mid_dim, generator=g)
    grid = torch.randn(args.k, c.grid_side**2, c.grid_dim, generator=g).abs()
    states = torch.randn(1, args.tokens, c.text_dim, generator=g)
    lengths = torch.tensor([args.tokens])

    def call():
        return model.score(model.text_state(states, lengths), model.image_state(grid, mid))

    times = []
    with torch.no_grad(), autocast():
        for _ in range(3):
            call()
        for _ in range(args.calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    print(f"{args.model}: 1 text x {args.k} images: p50 {ms:.1f} ms, {1e3 * args.k / ms:,.0f} pairs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
