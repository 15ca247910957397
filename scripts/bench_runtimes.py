#!/usr/bin/env python
"""The inference-runtime section of ``vlsearch bench`` alone (the same code, full size, ~5 min on 2 AVX2
cores): the image path and one text query on PyTorch, ONNX Runtime (fp32, and int8 for queries) and
OpenVINO, side by side in alternating rounds, with the issue-19 target lines.

    .venv/bin/python scripts/bench_runtimes.py [--model fast] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast", help="dual encoder checkpoint or name")
    p.add_argument("--json", default=None, help="also write the section as JSON here")
    args = p.parse_args(argv)

    from vlsearch.bench import runtimes
    from vlsearch.bench.data import BenchData
    from vlsearch.models.embedder import Embedder
    from vlsearch.models.registry import load_model

    net, _, _ = load_model(args.model)
    data = BenchData.load(
        Embedder(net, progress=False), None, max_queries=1000, max_images=2000, progress=False
    )
    with tempfile.TemporaryDirectory() as work:
        section = runtimes.run(data, net, Path(work), quick=False)
    if args.json:
        Path(args.json).write_text(json.dumps(section, indent=1, default=str))
    print(runtimes.table(section))
    print("\n".join(f"- {line}" for line in runtimes.targets(section)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
