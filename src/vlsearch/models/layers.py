"""A BERT-style transformer layer we can initialise from MiniLM and extend with cross-attention.

Written out with plain matmuls (no dropout, no fused attention) because on this CPU those train faster
than the built-in kernels, and so the attention weights are at hand for explanations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.encoders.text import load_minilm, masked_mean

__all__ = [
    "Attention",
    "TransformerLayer",
    "image_tower",
    "masked_mean",
    "mean_max_pool",
    "minilm_upper_layers",
]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.last_weights: torch.Tensor | None = None
        self.keep_weights = False

    def scores_values(self, x: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled per-head scores [B,H,Lq,Lk] of queries x [B,Lq,D] on keys kv [B,Lk,Dkv], and the values
        [B,H,Lk,hd]: the part every attention variant shares (the deformer's gated one too)."""
        B, Lq, _ = x.shape
        Lk = kv.shape[1]
        q = self.q(x).view(B, Lq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(kv).view(B, Lk, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(kv).view(B, Lk, self.heads, self.head_dim).transpose(1, 2)
        return (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim), v

    def merge(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Per-head context ctx [B,H,Lq,hd] -> output projection + post-LN residual with x [B,Lq,D]."""
        B, _, Lq, _ = ctx.shape
        return self.norm(x + self.out(ctx.transpose(1, 2).reshape(B, Lq, -1)))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B,Lq,D], kv [B,Lk,Dkv], kv_mask [B,Lk] bool (True = attend). Post-LN residual, as BERT."""
        scores, v = self.scores_values(x, kv)
        if kv_mask is not None:
            scores = scores.masked_fill(~kv_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1)
        if self.keep_weights:
            self.last_weights = weights.detach()
        return self.merge(x, weights @ v)


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention to a second sequence, then the feed-forward block."""

    def __init__(self, dim: int = 384, heads: int = 12, ffn: int = 1536, cross_dim: int | None = None):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, kv_dim=cross_dim) if cross_dim else None
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x, mask, cross=None, cross_mask=None):
        x = self.self_attn(x, x, mask)
        if self.cross_attn is not None and cross is not None:
            x = self.cross_attn(x, cross, cross_mask)
        return self.feed_forward(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block with its post-LN residual (after whatever attention ran)."""
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))

    @torch.no_grad()
    def load_bert_layer(self, layer) -> None:
        """Copy a transformers BertLayer's weights (the cross-attention, if any, stays freshly initialised)."""
        att = layer.attention
        for mine, theirs in (
            (self.self_attn.q, att.self.query),
            (self.self_attn.k, att.self.key),
            (self.self_attn.v, att.self.value),
            (self.self_attn.out, att.output.dense),
            (self.ffn_in, layer.intermediate.dense),
            (self.ffn_out, layer.output.dense),
        ):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        for mine, theirs in (
            (self.self_attn.norm, att.output.LayerNorm),
            (self.ffn_norm, layer.output.LayerNorm),
        ):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)


def minilm_upper_layers(split_layer: int, n_layers: int, cross_dim: int | None = None) -> nn.ModuleList:
    """Layers split_layer .. split_layer+n_layers-1 of MiniLM as TransformerLayers (beyond its depth: fresh)."""
    bert, _ = load_minilm()
    cfg = bert.config
    layers = nn.ModuleList()
    for i in range(n_layers):
        layer = TransformerLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cross_dim)
        src = split_layer + i
        if src < len(bert.encoder.layer):
            layer.load_bert_layer(bert.encoder.layer[src])
        layers.append(layer)
    return layers


def mean_max_pool(grid: torch.Tensor) -> torch.Tensor:
    """[B, cells, C] -> [B, 2C]: mean and max over the image's grid cells."""
    return torch.cat([grid.mean(1), grid.amax(1)], dim=-1)


def image_tower(in_dim: int, hidden: int, out_dim: int) -> tuple[nn.LayerNorm, nn.Sequential, nn.Linear]:
    """The Fast image tower's modules: LayerNorm, MLP and a linear skip; embedding = mlp(x) + skip(x)
    with x = norm(pooled). The deformer builds its own from here too, so a Fast checkpoint fits it."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    return nn.LayerNorm(in_dim), mlp, nn.Linear(in_dim, out_dim, bias=False)
