"""Turns images and texts into a dual encoder's embeddings, through the cached backbone features.

It lives under models/ (not search/) because index/ builds galleries with it and may only import downward."""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlsearch.data.images import ImageReport, load_image
from vlsearch.encoders import runtime as R
from vlsearch.encoders.features import FeatureExtractor, map_batches
from vlsearch.encoders.text import TextBackbone
from vlsearch.errors import QueryError
from vlsearch.models.fast import has_prior_column
from vlsearch.models.hubness import combine_query_vectors, zero_prior_column
from vlsearch.precision import autocast, inference_copy
from vlsearch.settings import MAX_QUERY_CHARS

log = logging.getLogger(__name__)


def check_query(text) -> str:
    """Reject what cannot be a text query, with a message the user can act on."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise QueryError("query is not valid UTF-8 text") from e
    if not isinstance(text, str):
        raise QueryError("query must be text")
    if "\x00" in text or any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise QueryError("query contains binary data")
    text = " ".join(text.split())
    if not text:
        raise QueryError("query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    return text


# Token lengths that get fixed-shape query models (OpenVINO): a caption-like query is 10-20 tokens, and
# padding costs about linearly, so the steps are fine where queries are frequent.
QUERY_LENGTHS = (8, 12, 16, 20, 24, 32, 40)
# A freshly made int8 query graph must stay this close to fp32 on the probes, else fp32 runs: on Flickr8k
# dev's 5,000 captions `fast`'s int8 graph measured min 0.980, mean 0.993 (and recall held).
INT8_MIN_COS = 0.95
INT8_PROBES = (
    "a dog",
    "a black dog runs through the grass with a ball in its mouth",
    "two children play on the beach near the water",
    "a man in a red jacket climbs a snowy mountain",
    "a plate of food",
    "a cat sleeping on a sofa",
    "people walking down a busy city street at night",
    "a woman rides a bicycle past a white building while a boy watches from the steps",
)


class Embedder:
    """A dual encoder (Fast or decomposed deformer) plus the feature cache it reads from."""

    def __init__(
        self,
        model,
        extractor: FeatureExtractor | None = None,
        progress: bool = True,
        runtime: str | None = None,
        query_threads: int | None = None,
        query_int8: bool | None = None,
    ):
        self.model = inference_copy(model)
        self._fp32_model = model  # what the query graph is exported from (inference_copy may hold bf16)
        self.extractor = extractor or FeatureExtractor(progress=progress)
        self.progress = progress
        # Text queries run as one graph (tokens -> embedding) on this runtime (encoders/runtime.py).
        self.query_runtime = R.resolve(runtime, "query")
        self.query_threads = query_threads or R.query_threads_default()
        # int8 matmuls in the query graph (None: R.query_int8's choice for this runtime)
        if query_int8 is None:
            query_int8 = R.query_int8(self.query_runtime)
        self.query_int8 = query_int8 and self.query_runtime == "onnxruntime"
        self._query_graphs: dict[bool, R.CompiledGraph | None] = {}
        self._query_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return getattr(self.model, "output_dim", self.model.config.embed_dim)

    @torch.no_grad()
    def _image(self, grid: np.ndarray, mid: np.ndarray | None = None) -> np.ndarray:
        with autocast():
            g = torch.from_numpy(np.asarray(grid, dtype=np.float32))
            m = torch.from_numpy(np.asarray(mid, dtype=np.float32)) if mid is not None else None
            return self.model.encode_image(g, m).float().numpy()

    @torch.no_grad()
    def _text(self, states: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with autocast():
            s = torch.from_numpy(np.asarray(states, dtype=np.float32))
            return self.model.encode_text(s, torch.from_numpy(np.asarray(lengths))).float().numpy()

    def embed_keys(self, keys: list[str], batch: int = 512) -> np.ndarray:
        """Embeddings of cached images by content key."""
        store = self.extractor.images
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        parts = map_batches(
            lambda s, e: self._image(
                store.get_stacked(keys[s:e], "grid"), store.get_stacked(keys[s:e], "mid")
            ),
            len(keys),
            batch,
            "embed images",
            self.progress and len(keys) > batch,
        )
        return np.concatenate(parts)

    def embed_paths(
        self, paths: Sequence[str | Path], report: ImageReport | None = None
    ) -> tuple[np.ndarray, list[str | None]]:
        """(embeddings of the readable images, content key per path or None if unreadable)."""
        feats = self.extractor.image_keys(paths, report)
        keys = [k for k in feats.keys if k is not None]
        return self.embed_keys(keys), feats.keys

    def embed_image(self, image) -> np.ndarray:
        """One query image (path, bytes or PIL) -> [D]. Raises QueryError when it is not an image."""
        try:
            arr = load_image(image, self.extractor.image_config.image_size)
        except ValueError as e:
            raise QueryError(str(e)) from e
        out = self.extractor.encode_image_arrays([arr])
        return zero_prior_column(self._image(out["grid"], out["mid"])[0], has_prior_column(self.model))

    def combine_queries(self, vectors: np.ndarray, weights) -> tuple[np.ndarray, float]:
        """One compound query from its terms' vectors: the weighted sum, renormalised; (vector, norm)."""
        return combine_query_vectors(vectors, weights, has_prior_column(self.model))

    def query_graph(self) -> R.CompiledGraph | None:
        """The text query path (MiniLM, then this model's text tower) as one graph on the query runtime,
        exported on first use; None when PyTorch runs it. One per concept and hubness switch (they change
        the output)."""
        if self.query_runtime == "torch":
            return None
        switches = (bool(getattr(self.model, "concepts_active", False)), has_prior_column(self.model))
        with self._query_lock:
            if switches not in self._query_graphs:
                self._query_graphs[switches] = R.compile_or_none(
                    lambda: self._export_query_graph(*switches), f"text queries on {self.query_runtime}"
                )
            return self._query_graphs[switches]

    def fp32_query_path(self, concepts: bool, hubness: bool | None = None) -> torch.nn.Module:
        """The text query path in fp32 PyTorch: what the graph is exported from (and a reference)."""
        config = self.extractor.text_config
        model = copy.deepcopy(self._fp32_model).eval()
        if hasattr(model, "use_concepts"):
            model.use_concepts = concepts
        if hasattr(model, "use_hubness"):
            model.use_hubness = has_prior_column(self.model) if hubness is None else hubness
        return _QueryPath(TextBackbone(type(config)(**{**config.__dict__, "bf16": False})), model)

    def _export_query_graph(self, concepts: bool, hubness: bool) -> R.CompiledGraph:
        source = self.fp32_query_path(concepts, hubness)
        graph = self._compile_query_graph(source, concepts, self.query_int8)
        if graph.int8 and graph.exported:
            worst = self._int8_fidelity(graph, source)
            if worst < INT8_MIN_COS:  # int8 broke this model: drop the export, so no later start uses it
                msg = f"int8 text queries: cosine {worst:.3f} to fp32 < {INT8_MIN_COS}; using fp32"
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
                graph.path.unlink(missing_ok=True)
                graph = self._compile_query_graph(source, concepts, False)
        return graph

    def _int8_fidelity(self, graph: R.CompiledGraph, reference: torch.nn.Module) -> float:
        """The lowest cosine between the int8 graph's and fp32 PyTorch's embeddings of the probe queries."""
        backbone = self.extractor.text_backbone
        width = self.dim - (1 if has_prior_column(reference.model) else 0)  # the constant column: left out
        worst = 1.0
        with torch.no_grad():
            for text in INT8_PROBES:
                ids, mask = backbone.tokenize_one(text)
                want = reference(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0][:width]
                got = graph(ids, mask)[0][0][:width]
                worst = min(worst, float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got))))
        return worst

    def _compile_query_graph(self, source: torch.nn.Module, concepts: bool, int8: bool) -> R.CompiledGraph:
        config = self.extractor.text_config
        ids = self.extractor.text_backbone.tokenize(["a dog runs on the grass"])
        return R.CompiledGraph(
            f"query-{getattr(self.model, 'model_type', type(self.model).__name__)}",
            source,
            [ids["input_ids"].numpy(), ids["attention_mask"].numpy()],
            ["input_ids", "attention_mask"],
            ["embedding"],
            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
            self.query_runtime,
            threads=self.query_threads,
            key_extra=f"{config.tag}|concepts={concepts}"
            + ("|hubness" if has_prior_column(source.model) else ""),
            allow_bf16=config.bf16,
            static_lengths=QUERY_LENGTHS,
            int8=int8,
        )

    def embed_texts(self, texts: list[str], cached: bool = True, batch: int = 1024) -> np.ndarray:
        """Captions (cached: dataset text) or queries (uncached) -> [N, D]."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if not cached:
            texts = [check_query(t) for t in texts]
            graph = self.query_graph()
            if graph is not None:
                backbone = self.extractor.text_backbone
                if len(texts) == 1 or graph.int8:  # int8 scales activations per call: one text per call,
                    # so a query's vector does not depend on what it was batched with
                    return np.concatenate([graph(*backbone.tokenize_one(t))[0] for t in texts])
                tokens = backbone.tokenize(texts, "np")
                return graph(tokens["input_ids"], tokens["attention_mask"])[0]
            states, lengths, _ = self.extractor.encode_texts(texts)
            return self._text(states, lengths)
        keys = self.extractor.text_keys(texts)
        store = self.extractor.texts

        def run(s, e):
            states, lengths = store.get_padded(keys[s:e], "states")
            return self._text(states, lengths)

        return np.concatenate(
            map_batches(run, len(keys), batch, "embed texts", self.progress and len(keys) > batch)
        )

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_texts([text], cached=False)[0]


class _QueryPath(torch.nn.Module):
    """What the query graph holds: fp32 MiniLM lower layers, then the dual encoder's text tower."""

    def __init__(self, backbone: TextBackbone, model):
        super().__init__()
        self.backbone, self.model = backbone, model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids, attention_mask)
        return self.model.encode_text(states, attention_mask.sum(1))
