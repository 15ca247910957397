"""Hard negatives mined with a dual encoder: what a re-ranker has to sort at query time.

For every caption, the top-ranked *wrong* images under the Fast model; for every image, the top-ranked
captions of *other* images. Used by the Slow trainer (listwise loss over positive + hard negatives) and by
the distillation cache (fixed candidate sets); the deformer trainer may use them too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from vlsearch.config import read_npz, write_npz
from vlsearch.models.embed import embed_features
from vlsearch.models.registry import fingerprint, load_model
from vlsearch.settings import home


def mine_from_embeddings(
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    caption_image: np.ndarray | torch.Tensor,
    k: int,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """(neg_images_per_caption [M,k], neg_captions_per_image [N,k]) from unit embeddings, best first.

    A caption's own image and an image's own captions are never returned. ``k`` is capped by what exists
    (N-1 images; M minus the image's captions), so very small sets give fewer columns.
    """
    img = torch.as_tensor(np.asarray(image_emb, dtype=np.float32))
    txt = torch.as_tensor(np.asarray(text_emb, dtype=np.float32))
    cap_img = torch.as_tensor(np.asarray(caption_image, dtype=np.int64))
    n, m = len(img), len(txt)
    counts = torch.bincount(cap_img, minlength=n)
    k_img = max(0, min(k, n - 1))
    k_cap = max(0, min(k, m - int(counts.max()) if m else 0))
    neg_img = torch.empty(m, k_img, dtype=torch.int64)
    for s in range(0, m, chunk):
        sim = txt[s : s + chunk] @ img.T  # [c, N]
        rows = torch.arange(len(sim))
        sim[rows, cap_img[s : s + chunk]] = float("-inf")
        neg_img[s : s + chunk] = sim.topk(k_img, dim=1).indices
    neg_cap = torch.empty(n, k_cap, dtype=torch.int64)
    for s in range(0, n, chunk):
        sim = img[s : s + chunk] @ txt.T  # [c, M]
        own = cap_img[None, :] == torch.arange(s, s + len(sim))[:, None]
        sim = sim.masked_fill(own, float("-inf"))
        neg_cap[s : s + chunk] = sim.topk(k_cap, dim=1).indices
    return neg_img.numpy(), neg_cap.numpy()


def mine_hard_negatives(model, feats, k: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives of a dual encoder (e.g. the trained Fast model) over ``feats`` (a DatasetFeatures).

    Returns (neg_images_per_caption [M,k] image rows, neg_captions_per_image [N,k] caption rows), each
    row sorted from the most to the least confusable.
    """
    img, txt = embed_features(model, feats)
    return mine_from_embeddings(img, txt, feats.caption_image.numpy(), k)


def features_fingerprint(feats) -> str:
    """A short hash of what a DatasetFeatures holds (image files and captions, in order)."""
    h = hashlib.sha1()
    for p in feats.dataset.image_paths:
        h.update(str(p).rsplit("/", 1)[-1].encode() + b"\0")
    for c in feats.dataset.captions:
        h.update(c.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def cached_fast_candidates(fast_name_or_path, feats, k: int, progress: bool = False) -> dict:
    """Fast hard negatives of ``feats`` (as ``mine_hard_negatives``) plus the embeddings they came from,
    cached on disk under $VLSEARCH_HOME/mining keyed by the Fast checkpoint's weights and the data.

    Returns {"neg_img" [M,k], "neg_cap" [N,k], "image_emb" [N,D], "text_emb" [M,D], "scale": float}."""
    model, _, path = load_model(fast_name_or_path)
    key = f"{fingerprint(path)}-{features_fingerprint(feats)}-k{k}"
    cache = home() / "mining" / f"{key}.npz"
    out = read_npz(cache)
    if out is not None:
        out["scale"] = float(out["scale"])
        return out
    img, txt = embed_features(model, feats)
    neg_img, neg_cap = mine_from_embeddings(img, txt, feats.caption_image.numpy(), k)
    out = {
        "neg_img": neg_img,
        "neg_cap": neg_cap,
        "image_emb": img.astype(np.float32),
        "text_emb": txt.astype(np.float32),
        "scale": np.float32(float(model.scale.detach())),
    }
    write_npz(cache, **out)
    out["scale"] = float(out["scale"])
    return out
