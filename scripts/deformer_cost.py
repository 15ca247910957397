#!/usr/bin/env python
"""Per text query cost of VLDeformer's joint model vs its decomposition, at 1k, 10k and 100k images.

Both models run in this one process on this machine. The 1k gallery is the real Flickr8k dev gallery
(its cached features); the 10k and 100k galleries are synthetic (random unit vectors appended to the real
embeddings for the decomposed model's index; the joint model's per-pair time, measured over the full 1k
gallery, is scaled linearly, which is exact for a model that runs one forward pass per gallery image).

    .venv/bin/python scripts/deformer_cost.py [--joint deformer-joint] [--decomposed deformer]
        [--queries 20] [--sizes 1000 10000 100000] [--index flat] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--joint", default="deformer-joint", help="joint (pair-scoring) checkpoint or name")
    p.add_argument("--decomposed", default="deformer", help="decomposed (dual-encoder) checkpoint or name")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="dev")
    p.add_argument("--queries", type=int, default=20, help="real dev captions timed as queries")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument(
        "--index", default="flat", help="faiss index kind for the decomposed search (flat = exact)"
    )
    p.add_argument(
        "--no-text",
        action="store_true",
        help="skip the from-text columns (the decomposed query through the search path's query runtime)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from vlsearch.settings import configure_torch

    configure_torch()
    import torch

    from vlsearch.bench.deformer import joint_vs_decomposed_cost
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.registry import load_model

    joint, _, joint_path = load_model(args.joint)
    dec, _, dec_path = load_model(args.decomposed)
    if joint.config.mode != "joint" or dec.config.mode != "decomposed":
        print("--joint must be a joint deformer and --decomposed a decomposed one", file=sys.stderr)
        return 2
    feats = DatasetFeatures.load(load_dataset(args.data_root, args.split), mid=True, progress=False)
    q = torch.arange(min(args.queries, len(feats.states)))
    from_text = {}
    if not args.no_text:
        from vlsearch.models.embedder import Embedder

        embedder = Embedder(dec, progress=False)
        from_text = {
            "query_texts": [feats.dataset.captions[int(i)] for i in q],  # the rows of feats.states
            "embed_query": embedder.embed_query,
            "text_states": embedder.extractor.encode_texts,
        }
    rows = joint_vs_decomposed_cost(
        joint,
        dec,
        feats.grid,
        feats.mid if (joint.config.use_mid or dec.config.use_mid) else None,
        feats.states[q],
        feats.lengths[q],
        gallery_sizes=tuple(args.sizes),
        joint_measured=feats.n_images,
        index_kind=args.index,
        **from_text,
    )
    result = {
        "joint": str(joint_path),
        "decomposed": str(dec_path),
        "real_gallery_images": feats.n_images,
        "queries": len(q),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"{feats.n_images} real {args.split} images, {len(q)} real caption queries, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        "| gallery | joint ms/query | decomposed ms/query, one at a time (encode + search) | speed-up "
        f"| decomposed ms/query, {len(q)} queries per batch | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        star = " (extrapolated)" if r["joint_extrapolated"] else ""
        print(
            f"| {r['gallery']:,} | {r['joint_ms_per_query']:,.0f}{star} | "
            f"{r['decomposed_ms_per_query']:.2f} ({r['decomposed_encode_ms']:.2f} + "
            f"{r['decomposed_search_ms']:.2f}, {r['index']}) | {r['speedup']:,.0f}x | "
            f"{r['decomposed_batched_ms_per_query']:.3f} | {r['speedup_batched']:,.0f}x |"
        )
    if rows and "speedup_from_text" in rows[0]:
        print(
            "\nFrom text, as search runs a query: the decomposed model's whole query path (tokenise, MiniLM, "
            "its text stream) on the query runtime, and the joint model charged its MiniLM states"
        )
        print(
            "| gallery | joint ms/query (+ text states) | decomposed ms/query from text (encode + search) | speed-up |"
        )
        print("|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['gallery']:,} | {r['joint_ms_per_query'] + r['joint_text_states_ms']:,.0f} "
                f"(+{r['joint_text_states_ms']:.2f}) | {r['decomposed_ms_per_query_from_text']:.2f} "
                f"({r['decomposed_query_from_text_ms']:.2f} + {r['decomposed_search_ms']:.2f}) | "
                f"{r['speedup_from_text']:,.0f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
