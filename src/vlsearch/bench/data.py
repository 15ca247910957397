"""Real inputs for the bench: a dataset's photos and captions, their cached features and Fast embeddings,
and synthetic galleries of the same shape beyond the real ones (unit vectors near real embeddings)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from vlsearch.data import CaptionDataset, load_dataset
from vlsearch.data.images import load_image
from vlsearch.errors import DataError


def load_gallery_dataset(root=None) -> tuple[CaptionDataset, list[str]]:
    """All images we have (train + dev, when the dataset has those splits) and held-out query captions (dev)."""
    dev = load_dataset(root, "dev")
    try:
        train = load_dataset(root, "train")
    except DataError:
        train = None
    if train is None or train.image_paths == dev.image_paths:
        return dev, list(dev.captions)
    ds = CaptionDataset(
        dev.name,
        "train+dev",
        train.image_paths + dev.image_paths,
        train.image_ids + dev.image_ids,
        train.captions + dev.captions,
        np.concatenate([train.caption_image, dev.caption_image + train.n_images]),
    )
    return ds, list(dev.captions)


@dataclass
class BenchData:
    dataset: CaptionDataset
    queries: list[str]  # held-out captions: query texts
    embedder: object  # vlsearch.models.embedder.Embedder
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None  # [n_real, D] float32 Fast image embeddings
    query_embeddings: np.ndarray | None = None

    @classmethod
    def load(
        cls,
        embedder,
        root=None,
        max_queries: int = 1000,
        max_images: int | None = None,
        progress: bool = True,
    ) -> BenchData:
        ds, queries = load_gallery_dataset(root)
        if max_images and ds.n_images > max_images:
            ds = ds.subset(range(max_images))
        data = cls(ds, queries[:max_queries] if max_queries else queries, embedder)
        if progress:
            print(f"bench: embedding {ds.n_images} real images ({ds.name})", file=sys.stderr)
        emb, keys = embedder.embed_paths(ds.image_paths)
        ok = [i for i, k in enumerate(keys) if k is not None]
        data.keys = [keys[i] for i in ok]
        data.paths = [str(ds.image_paths[i]) for i in ok]
        data.ids = [ds.image_ids[i] for i in ok]
        data.embeddings = np.asarray(emb, dtype=np.float32)
        data.query_embeddings = embedder.embed_texts(data.queries)
        return data

    @property
    def n_real(self) -> int:
        return len(self.keys)

    # -- inputs for the throughput sections ---------------------------------------------------------------
    def _tile(self, n: int) -> list[int]:
        return [i % self.n_real for i in range(n)]

    def image_arrays(self, n: int) -> np.ndarray:
        return np.stack([load_image(self.paths[i]) for i in self._tile(n)])

    def captions(self, n: int) -> list[str]:
        return [self.queries[i % len(self.queries)] for i in range(n)]

    def grid(self, n: int) -> np.ndarray:
        return self.embedder.extractor.images.get_stacked([self.keys[i] for i in self._tile(n)], "grid")

    def mid(self, n: int) -> np.ndarray:
        return self.embedder.extractor.images.get_stacked([self.keys[i] for i in self._tile(n)], "mid")

    def query_states(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        fx = self.embedder.extractor
        keys = fx.text_keys(self.captions(n))
        return fx.texts.get_padded(keys, "states")

    # -- synthetic galleries --------------------------------------------------------------------------------
    def neighbour_cosine(self, sample: int = 2000) -> float:
        """Median cosine between a real image embedding and its nearest other real image."""
        e = self.embeddings[: min(sample, self.n_real)]
        if len(e) < 2:
            return 0.8
        sims = e @ self.embeddings.T
        sims[np.arange(len(e)), np.arange(len(e))] = -np.inf
        return float(np.median(sims.max(1)))

    def gallery(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
        """[n, D] unit vectors: the real embeddings first, then synthetic ones near random real ones.

        A synthetic vector is normalize(e + sigma * g / sqrt(D)), e a random real embedding, g Gaussian;
        sigma is set so its cosine to e (1 / sqrt(1 + sigma^2)) equals the median cosine between a real
        image and its nearest real neighbour: the synthetic galleries are as dense as the real one.
        Returns (embeddings, source row: the real image each row is or is near, description).
        """
        real = self.embeddings
        n_real = min(n, len(real))
        cos = min(max(self.neighbour_cosine(), 0.3), 0.99)
        sigma = float(np.sqrt(1.0 / cos**2 - 1.0))
        out = np.empty((n, real.shape[1]), np.float32)
        out[:n_real] = real[:n_real]
        source = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        d = real.shape[1]
        for s in range(n_real, n, 100_000):
            e = min(n, s + 100_000)
            seeds = rng.integers(0, len(real), e - s)
            x = real[seeds] + (sigma / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:e] = x
            source[s:e] = seeds
        meta = {
            "n": n,
            "real": n_real,
            "synthetic": n - n_real,
            "neighbour_cosine": cos,
            "sigma": sigma,
            "method": "normalize(real + sigma * N(0, I/D)), cosine to its real seed = median real NN cosine",
        }
        return out, source, meta
