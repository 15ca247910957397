"""Scores of one seeded Slow model (with a Fast prior) through every scoring path, on real dev features:
all pairs, Fast top-10 re-ranked both ways, the online Reranker and its explanation maps. Run it under
two source trees and compare, to show a refactor leaves every score bit-identical:

    git archive OLD src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python scripts/scoring_regression.py /tmp/old.npz
    PYTHONPATH=src python scripts/scoring_regression.py /tmp/new.npz
    python scripts/scoring_regression.py --compare /tmp/old.npz /tmp/new.npz

Needs the named model `fast` and the Flickr8k data ($VLSEARCH_DATA, else ../shared/data).
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import numpy as np


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    same = True
    for key in a.files:
        x, y = a[key], b[key]
        equal = x.shape == y.shape and np.array_equal(x, y)
        same &= equal
        diff = "" if equal or x.shape != y.shape else f" max |diff| {np.abs(x - y).max():.3g}"
        print(f"{key:6s} {str(x.shape):12s} {'bit-identical' if equal else 'DIFFERENT' + diff}")
    return 0 if same else 1


def dump(out: str) -> int:
    import torch

    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.encoders.features import FeatureExtractor
    from vlsearch.models.embed import embed_features
    from vlsearch.models.registry import load_model
    from vlsearch.models.slow import SlowConfig, SlowModel
    from vlsearch.search.rerank import Reranker
    from vlsearch.settings import data_root, set_offline

    try:  # the layout after issue 14's split, else the one before it
        from vlsearch.search.pair_scoring import rerank_candidates, score_all_pairs
    except ImportError:
        from vlsearch.search.rerank import rerank_candidates, score_all_pairs

    set_offline()
    ds = load_dataset(data_root() / "flickr8k", "dev").sample(40, 0)
    feats = DatasetFeatures.load(ds, mid=True, progress=False)
    fast = load_model("fast")[0].eval()
    torch.manual_seed(0)
    model = SlowModel(SlowConfig(fast_prior=asdict(fast.config), fusion_weight=0.5))
    model.set_prior(fast)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head[-1].weight, std=0.5)  # a head with weights: not just the prior
    model.eval()
    img, txt = embed_features(fast, feats)
    sim = txt @ img.T
    all_pairs = score_all_pairs(model, feats, progress=False)
    cand_t2i, t2i, cand_i2t, i2t, _, _ = rerank_candidates(model, feats, sim, 10, progress=False)
    fx = FeatureExtractor(progress=False)
    keys = fx.image_keys(ds.image_paths[:12]).keys
    reranker = Reranker(model, extractor=fx)
    zeros = np.zeros(len(keys), np.float32)
    fused, online, _ = reranker.rerank_text("a dog runs on the grass", keys, zeros)
    _, explained, maps = reranker.rerank_text("two children play in the water", keys, zeros, explain=True)
    np.savez(
        out,
        all_pairs=all_pairs,
        cand_t2i=cand_t2i,
        t2i=t2i,
        cand_i2t=cand_i2t,
        i2t=i2t,
        online=online,
        fused=fused,
        explained=explained,
        maps=np.stack([np.asarray(m["maps"]) for m in maps]),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    sys.exit(dump(sys.argv[1]))
