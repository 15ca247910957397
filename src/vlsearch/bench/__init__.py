"""`vlsearch bench`: encoders, pair scorers and query latency side by side with peers, on this machine.

Sections (``runner.run_bench`` runs them all in one process, writes ``bench.json``, ``bench.png`` and
``bench.md``): ``hardware`` (memory bandwidth, bf16/fp32 matmul rate: the floors), ``throughput``
(images/s, texts/s, pairs/s against CLIP ViT-B/32 and the BLIP-base ITM head), ``gallery`` (query latency,
recall of the approximate indexes, build time and memory per gallery size), ``service`` (peak RSS of
``vlsearch serve``). See docs/bench.md.
"""

from vlsearch.bench.runner import run_bench

__all__ = ["run_bench"]
