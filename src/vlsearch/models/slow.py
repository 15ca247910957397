"""The Slow model: text tokens cross-attend to the image's spatial feature maps (Miech et al.'s Slow).

Text enters as cached MiniLM layer-``split_layer`` token states and runs through MiniLM's upper layers, each
extended with a cross-attention block (initialised from MiniLM as ALBEF initialises its fusion encoder from
BERT; the cross-attention starts fresh). Keys/values of the cross-attentions are the image's tokens: the
14x14 ``mid`` map (EfficientNet-Lite0 block 10, 112 channels, projected to 384, 2-D position embeddings)
and, optionally, the 7x7 ``grid`` map (1280 channels). An image-text-matching head on [CLS] turns the
fused text into one score per (text, image) pair.

Layout, chosen for pair throughput on CPU (docs/slow.md):
- fusion layer 0 (MiniLM layer 4): self-attention and feed-forward on the text alone, then every word
  cross-attends to the image. The text-only part and the cross-attention queries are computed once per
  text (``text_state``); these are the word-to-region weights that explain a result.
- fusion layers 1.. (MiniLM layer 5, ...): self-attention, cross-attention, feed-forward per pair; the last
  one only for the [CLS] query, the one the head reads.
- the image side (tokens and each layer's cross-attention keys/values, ``image_kv``) never depends on the
  text: computed once per image and reused by every text scored against it. ``score_block`` scores all
  texts x images without copying per pair; ``score_pairs`` takes arbitrary pairs. bf16 autocast.
- one query against its K candidates (re-ranking) computes no keys/values at all: its few queries go
  through the key and value weights onto the image tokens (``_attend_through_weights``), the same scores
  for a fifth of the work (``score`` picks the cheaper way per block).

A Fast prior (``SlowConfig.fast_prior``, the default for `vlsearch train slow`): the model carries a frozen
copy of the trained Fast towers, and its score is ``prior_scale * fast_cosine + ITM head``, with the head's
last layer starting at zero. Training starts from Fast's ranking and learns what cross-attention adds on
Fast's own hard negatives (Miech et al. initialise nothing from Fast; this is the "initialise from the Fast
towers" lever of issue 12, measured in the README). The prior's image vector is part of the image state,
so every consumer of ``image_kv`` (the re-ranker's per-image cache, training, eval) carries it unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.models.fast import FastConfig, FastModel
from vlsearch.models.layers import Attention, TransformerLayer, minilm_upper_layers
from vlsearch.models.states import ImageKV, SlowImageState, TextState
from vlsearch.precision import autocast, fp32_head, run_fp32


@dataclass
class SlowConfig:
    text_dim: int = 384
    heads: int = 12
    cross_heads: int = 4  # fresh cross-attention: fewer, wider heads keep the [words x regions] softmax small
    ffn: int = 1536
    split_layer: int = 4  # text states come cached after this many MiniLM layers
    n_layers: int = 2  # fusion layers: MiniLM layers split_layer.. (beyond MiniLM's depth: fresh)
    mid_dim: int = 112
    mid_side: int = 14
    use_grid: bool = True  # also attend to the 7x7 final-layer grid
    grid_dim: int = 1280
    grid_side: int = 7
    # fused = fast_cosine + fusion_weight * slow_score; chosen on dev after training (per direction)
    fusion_weight: float = 0.0
    fusion_weight_i2t: float = 0.0
    # the FastConfig (as a dict) of a frozen Fast model inside this one; its cosine is part of the score
    fast_prior: dict | None = None

    @property
    def n_image_tokens(self) -> int:
        return self.mid_side**2 + (self.grid_side**2 if self.use_grid else 0)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d)) v in the keys' dtype (bf16 when they were made under autocast); q
    broadcasts over k's batch. Without ``keep_weights`` it is one fused ``scaled_dot_product_attention``:
    the [.., Lq, Lk] weights are never materialised and k, v are read in the strides they were made in
    (the matmul form copied each transposed key block on every call: half the time of a Fast+Slow query)."""
    dtype = k.dtype
    with torch.autocast("cpu", enabled=False):
        if not keep_weights:
            q = q.to(dtype).expand(k.shape[0], *q.shape[1:])
            return F.scaled_dot_product_attention(q, k, v.to(dtype)), None
        q = (q * (1.0 / math.sqrt(q.shape[-1]))).to(dtype)
        w = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
        return torch.matmul(w, v.to(dtype)), w


def _attend_through_weights(attn: Attention, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``_attend(q, attn.k(tokens), attn.v(tokens))`` without computing any key or value: q [B,H,M,hd]
    (B = 1, shared by every image, or one block per image), tokens [N,Lk,D] -> [N,H,M,hd].

    A score q.k_j = (Wk_h^T q).t_j + q.bk, and the last term is the same for every key j, so softmax drops
    it; a context sum_j a_j (Wv t_j + bv) = Wv (sum_j a_j t_j) + bv, since the weights sum to 1. Queries go
    through the key weights and the weighted tokens through the value weights: 2*H*M*Lk*D + M*D*D
    multiply-adds per image instead of 2*Lk*D*D for the keys and values alone, less whenever
    M < ~100 (one text: M is its length, 8-32)."""
    N, Lk, D = tokens.shape
    B, H, M, hd = q.shape
    dtype = tokens.dtype
    with torch.autocast("cpu", enabled=False):
        wk = attn.k.weight.view(H, hd, D)
        qk = torch.matmul(q.transpose(0, 1).reshape(H, B * M, hd).to(wk.dtype), wk)  # [H, B*M, D]
        qk = qk.view(H, B, M, D).transpose(0, 1).reshape(B, H * M, D).to(dtype)
        if B == 1:  # one matmul over every image's tokens
            s = (tokens.reshape(N * Lk, D) @ qk[0].t()).view(N, Lk, H * M).transpose(1, 2)
        else:
            s = torch.bmm(qk, tokens.transpose(1, 2))  # [N, H*M, Lk]
        w = (s.float() * (1.0 / math.sqrt(hd))).softmax(-1).to(dtype)
        mixed = torch.bmm(w, tokens).view(N, H, M, D).transpose(0, 1).reshape(H, N * M, D)
        wv = attn.v.weight.view(H, hd, D).transpose(1, 2).to(dtype)  # [H, D, hd]
        ctx = torch.bmm(mixed, wv).view(H, N, M, hd).transpose(0, 1)
        return ctx + attn.v.bias.view(1, H, 1, hd).to(dtype)


def through_weights(text_rows: int, length: int, heads: int, dim: int) -> bool:
    """Whether a block of ``text_rows`` texts of ``length`` tokens is scored cheaper through the weights
    (``_attend_through_weights``) than from computed keys/values: when its cross-attention queries number
    at most dim/heads (96 here; the break-even is ~100 for 245 image tokens)."""
    return text_rows * length * heads <= dim


def _inference_dtype(default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype autocast computes in (bf16) when it is on and nothing is trained, else ``default``:
    training keeps its fp32 normalisations."""
    if torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled():
        return torch.get_autocast_dtype("cpu")
    return default


class SlowModel(nn.Module):
    model_type = "slow"
    is_pair_scorer = True

    def __init__(self, config: SlowConfig, init_from_pretrained: bool = True):
        super().__init__()
        self.config = c = config
        D = c.text_dim
        self.mid_norm = nn.LayerNorm(c.mid_dim)
        self.mid_proj = nn.Sequential(nn.Linear(c.mid_dim, D), nn.GELU(), nn.Linear(D, D))
        self.mid_row = nn.Parameter(torch.randn(c.mid_side, D) * 0.02)
        self.mid_col = nn.Parameter(torch.randn(c.mid_side, D) * 0.02)
        if c.use_grid:
            self.grid_norm = nn.LayerNorm(c.grid_dim)
            self.grid_proj = nn.Linear(c.grid_dim, D)
            self.grid_row = nn.Parameter(torch.randn(c.grid_side, D) * 0.02)
            self.grid_col = nn.Parameter(torch.randn(c.grid_side, D) * 0.02)
            self.grid_type = nn.Parameter(torch.randn(D) * 0.02)
        self.image_norm = nn.LayerNorm(D)
        if init_from_pretrained:
            self.layers = minilm_upper_layers(c.split_layer, c.n_layers, cross_dim=D)
        else:
            self.layers = nn.ModuleList(
                TransformerLayer(D, c.heads, c.ffn, cross_dim=D) for _ in range(c.n_layers)
            )
        if c.cross_heads != c.heads:
            for layer in self.layers:
                layer.cross_attn = Attention(D, c.cross_heads, kv_dim=D)
        self.head = fp32_head(nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 1)))
        self.prior: FastModel | None = None
        if c.fast_prior is not None:
            self.prior = FastModel(FastConfig(**c.fast_prior), init_from_pretrained=False)
            self.prior.requires_grad_(False)
            self.prior_scale = nn.Parameter(torch.tensor(20.0))
            nn.init.zeros_(self.head[-1].weight)  # starts as Fast's ranking; a checkpoint overwrites it
            nn.init.zeros_(self.head[-1].bias)

    def set_prior(self, fast: FastModel) -> None:
        """Copy a trained Fast model's weights into the prior, and start from its logit scale."""
        if self.prior is None:
            raise ValueError("this Slow model has no Fast prior (SlowConfig.fast_prior is None)")
        self.prior.load_state_dict(fast.state_dict())
        with torch.no_grad():
            self.prior_scale.fill_(float(fast.scale))

    @contextlib.contextmanager
    def prior_swapped(self, fast: FastModel):
        """Score with another Fast model as the prior for a while (training on out-of-fold priors,
        training/crossfit.py); the model's own prior is back afterwards."""
        if self.prior is None:
            raise ValueError("this Slow model has no Fast prior (SlowConfig.fast_prior is None)")
        own = self.prior
        self.prior = fast
        try:
            yield self
        finally:
            self.prior = own

    def train(self, mode: bool = True):
        super().train(mode)
        if self.prior is not None:
            self.prior.eval()  # frozen: no dropout, whatever the rest does
        return self

    # -- image side: computed once per image -------------------------------------------------------------
    def image_tokens(
        self, grid: torch.Tensor | None, mid: torch.Tensor, grid_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mid [N,196,112] (+ grid [N,49,1280], or its projection ``grid_tokens`` [N,49,D] from a compact
        store) -> image tokens [N, Lk, D]."""
        c = self.config
        if mid is None:
            raise ValueError("the Slow model attends to the 14x14 mid map: pass mid features")
        N = mid.shape[0]
        dtype = _inference_dtype()  # under autocast the tokens stay bf16: half the bytes of each pass
        pos = (self.mid_row[:, None, :] + self.mid_col[None, :, :]).reshape(-1, c.text_dim)
        parts = [self.mid_proj(self.mid_norm(mid.float())).to(dtype) + pos.to(dtype)]
        if c.use_grid:
            if grid_tokens is None:
                if grid is None:
                    raise ValueError("this Slow model attends to the 7x7 grid too: pass grid features")
                grid_tokens = self.project_grid(grid)
            gpos = (self.grid_row[:, None, :] + self.grid_col[None, :, :]).reshape(-1, c.text_dim)
            parts.append(grid_tokens.to(dtype) + (gpos + self.grid_type).to(dtype))
        x = torch.cat(parts, dim=1)
        assert x.shape[:2] == (N, c.n_image_tokens)
        norm = self.image_norm
        with torch.autocast("cpu", enabled=False):  # autocast would run it, and return it, in fp32
            return F.layer_norm(
                x, norm.normalized_shape, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps
            )

    def project_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The grid's learned projection [N,49,D], before positions: what a compact store keeps of it."""
        return self.grid_proj(self.grid_norm(grid.float()))

    def image_kv(self, grid: torch.Tensor | None, mid: torch.Tensor) -> ImageKV:
        """Each fusion layer's cross-attention keys and values for these images: [(k, v)] [N,H,Lk,hd]
        (then the prior's image vectors, with a Fast prior)."""
        return self._kv(self.image_tokens(grid, mid), self._prior_images(grid))

    def _prior_images(self, grid: torch.Tensor | None) -> torch.Tensor | None:
        if self.prior is None:
            return None
        with torch.no_grad():
            return self.prior.encode_image(grid).float()

    def keys_values(self, image: SlowImageState) -> ImageKV:
        """The state's keys/values, computed from its tokens on first use and kept in it."""
        if image.kv is None:
            image.kv = self._kv(image.tokens, image.prior)
        return image.kv

    def _kv(self, tokens: torch.Tensor, prior: torch.Tensor | None) -> ImageKV:
        N, Lk, _ = tokens.shape
        tokens = tokens.to(_inference_dtype(tokens.dtype))  # cast once, not once per projection
        out = []
        for layer in self.layers:
            ca = layer.cross_attn
            k = ca.k(tokens).view(N, Lk, ca.heads, ca.head_dim).transpose(1, 2)
            v = ca.v(tokens).view(N, Lk, ca.heads, ca.head_dim).transpose(1, 2)
            out.append((k, v))
        if self.prior is not None:
            out.append((prior, prior))
        return out

    # -- models/contracts.CompactImages: the parts of an image a compact store keeps (encoders/compact.py)
    def compact_shapes(self) -> dict[str, tuple[int, int]]:
        """[tokens, dim] of each part: the raw mid map, the projected grid, the Fast prior's vector."""
        c = self.config
        shapes = {"mid": (c.mid_side**2, c.mid_dim)}
        if c.use_grid:
            shapes["grid_tokens"] = (c.grid_side**2, c.text_dim)
        if self.prior is not None:
            shapes["prior"] = (1, self.prior.embed_dim)
        return shapes

    @torch.no_grad()
    def compact_parts(self, grid: torch.Tensor | None, mid: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"mid": mid.float()}
        if self.config.use_grid:
            parts["grid_tokens"] = self.project_grid(grid).float()
        if self.prior is not None:
            parts["prior"] = self.prior.encode_image(grid).float()[:, None, :]
        return parts

    def image_state_from_parts(self, parts: dict[str, torch.Tensor]) -> SlowImageState:
        prior = parts["prior"][:, 0, :].float() if self.prior is not None else None
        return SlowImageState(self.image_tokens(None, parts["mid"], parts.get("grid_tokens")), prior)

    def compact_digest(self) -> str:
        """Names a compact store: a hash of the weights that make the parts (another checkpoint's parts
        differ), and of their shapes."""
        import hashlib

        h = hashlib.sha1(repr(sorted(self.compact_shapes().items())).encode())
        for name, value in sorted(self.state_dict().items()):
            if name.startswith(("grid_norm.", "grid_proj.", "prior.")):
                h.update(name.encode())
                h.update(value.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def _prior_scores(self, text: TextState, e: torch.Tensor | None, text_index=None, image_index=None):
        """prior_scale x Fast cosine with the images' prior vectors e [NI, E]: for the block [T, NI], or
        for the pairs [P]; 0 without a prior."""
        if self.prior is None:
            return 0.0
        t = text.prior
        if text_index is None:
            return self.prior_scale * (t @ e.t())
        return self.prior_scale * (t.index_select(0, text_index) * e.index_select(0, image_index)).sum(-1)

    # -- text side: computed once per text ---------------------------------------------------------------
    def text_state(self, states: torch.Tensor, lengths: torch.Tensor) -> TextState:
        """The first fusion layer's self-attention and feed-forward see only the text, so they (and its
        cross-attention queries) are computed once per text: states [T,L,384], lengths [T]."""
        T, L, _ = states.shape
        mask = torch.arange(L)[None, :] < lengths[:, None]
        first = self.layers[0]
        h = first.self_attn(states.float(), states.float(), mask)
        h = first.feed_forward(h)
        ca = first.cross_attn
        q = ca.q(h).view(T, L, ca.heads, ca.head_dim).transpose(1, 2)
        prior = None
        if self.prior is not None:
            with torch.no_grad():
                prior = self.prior.encode_text(states, lengths).float()
        return TextState(h, mask, q, prior)

    # -- the PairScorer contract (models/contracts.py) ------------------------------------------------------
    def image_state(self, grid: torch.Tensor | None, mid: torch.Tensor | None = None) -> SlowImageState:
        return SlowImageState(self.image_tokens(grid, mid), self._prior_images(grid))

    def score(self, text: TextState, image: SlowImageState) -> torch.Tensor:
        """Every text with every image [T, N], on the texts trimmed to their longest, rounded up to 8
        tokens (blocks of any rows see few distinct shapes, so the CPU kernels made for one shape serve the
        next). A few texts (one query) go through the key/value weights, many from computed keys/values
        (``through_weights``): the same scores to bf16 rounding."""
        trimmed = self._trim(text)
        ca = self.layers[0].cross_attn
        if through_weights(len(trimmed), trimmed.mask.shape[1], ca.heads, self.config.text_dim):
            return self._score_through_weights(trimmed, image)
        return self.score_from_keys_values(text, image)

    def score_from_keys_values(self, text: TextState, image: SlowImageState) -> torch.Tensor:
        """``score`` from the images' computed keys/values, whatever the block's size (the bench's
        before-and-after row, and blocks of many texts)."""
        return self.score_block(self._trim(text), self.keys_values(image))

    def score_with_maps(self, text: TextState, image: SlowImageState) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [T, N] and each pair's word-to-region maps [T, N, L, 196] (what explains a result)."""
        scores, weights = self.score_block(self._trim(text), self.keys_values(image), keep_weights=True)
        return scores, torch.stack([self.attention_maps(w) for w in weights])

    @staticmethod
    def _trim(text: TextState, round_to: int = 8) -> TextState:
        full = text.mask.shape[1]
        L = max(1, int(text.mask.sum(1).max())) if len(text) else 1
        L = min(full, -(-L // round_to) * round_to)
        return text if L == full else text.trimmed(L)

    # -- pairs ----------------------------------------------------------------------------------------------
    def score_block(
        self, text: TextState, kv: ImageKV, keep_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every text with every image: scores [T, NI]. Nothing is copied per pair before the first
        cross-attention. With keep_weights also the word-to-region weights [T, NI, L, Lk] (head mean)."""
        T, L = text.mask.shape
        k, v = kv[0]
        ctx, w = _attend(self._block_queries(text), k, v, keep_weights)  # [NI,H,T*L,hd], [NI,H,T*L,Lk]
        maps = w.float().mean(1).view(len(k), T, L, -1).transpose(0, 1) if keep_weights else None
        scores = self._finish_block(text, ctx, kv=kv) + self._prior_scores(text, self._kv_prior(kv))
        return (scores, maps) if keep_weights else scores

    def _score_through_weights(self, text: TextState, image: SlowImageState) -> torch.Tensor:
        """score_block's scores [T, NI] from the image tokens, with no keys/values computed."""
        tokens = image.tokens.to(_inference_dtype(image.tokens.dtype))
        ctx = _attend_through_weights(self.layers[0].cross_attn, self._block_queries(text), tokens)
        return self._finish_block(text, ctx, tokens=tokens) + self._prior_scores(text, image.prior)

    def _block_queries(self, text: TextState) -> torch.Tensor:
        """The first cross-attention's queries of every text as one block [1, H, T*L, hd]: every image of
        a block sees the same queries."""
        T, H, L, hd = text.q.shape
        return text.q.permute(1, 0, 2, 3).reshape(1, H, T * L, hd)

    def _finish_block(self, text: TextState, ctx: torch.Tensor, kv=None, tokens=None) -> torch.Tensor:
        """The first cross-attention's context of a block, ctx [NI,H,T*L,hd], -> the fusion layers' scores
        [T, NI] (without the prior), reading the images through ``kv`` or their ``tokens`` (``_upper``)."""
        T, L = text.mask.shape
        NI, H, _, hd = ctx.shape
        ctx = ctx.view(NI, H, T, L, hd).permute(0, 2, 1, 3, 4).reshape(NI * T, H, L, hd)
        h0 = text.h[None].expand(NI, *text.h.shape).reshape(NI * T, L, -1)
        mask = text.mask[None].expand(NI, T, L).reshape(NI * T, L)
        return self._upper(h0, ctx, mask, kv, block=(NI, T), tokens=tokens).view(NI, T).t()

    def _kv_prior(self, kv: ImageKV) -> torch.Tensor | None:
        """The prior's image vectors, the last ImageKV entry (with a prior)."""
        return kv[len(self.layers)][0] if self.prior is not None else None

    def score_pairs(
        self,
        text: TextState,
        kv: ImageKV,
        text_index: torch.Tensor,
        image_index: torch.Tensor,
        keep_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Arbitrary pairs (text_index[p], image_index[p]) -> scores [P] (and weights [P, L, Lk])."""
        k, v = (x.index_select(0, image_index) for x in kv[0])
        q = text.q.index_select(0, text_index)
        ctx, w = _attend(q, k, v, keep_weights)  # [P,H,L,hd]
        maps = w.float().mean(1) if keep_weights else None
        h0, mask = text.h.index_select(0, text_index), text.mask.index_select(0, text_index)
        scores = self._upper(h0, ctx, mask, kv, image_index=image_index)
        scores = scores + self._prior_scores(text, self._kv_prior(kv), text_index, image_index)
        return (scores, maps) if keep_weights else scores

    def _upper(self, h0, ctx, mask, kv, block=None, image_index=None, tokens=None) -> torch.Tensor:
        """Finish the first cross-attention (ctx [P,H,L,hd]), run the remaining fusion layers (the last one
        only for the [CLS] query: nothing else reaches the head) and score. ``block=(NI, T)``: pairs are
        image-major over NI images x T texts; else pair p uses image ``image_index[p]``. With ``tokens``
        (block only) the cross-attentions go through the weights, and ``kv`` is not read."""
        P, L = mask.shape
        ca = self.layers[0].cross_attn
        h = ca.merge(h0, ctx.to(h0.dtype))
        n = len(self.layers)
        for j in range(1, n):
            layer = self.layers[j]
            sa = layer.self_attn
            kk = sa.k(h).view(P, L, sa.heads, sa.head_dim).transpose(1, 2)
            vv = sa.v(h).view(P, L, sa.heads, sa.head_dim).transpose(1, 2)
            x = h[:, :1] if j == n - 1 else h
            Lq = x.shape[1]
            qq = sa.q(x).view(P, Lq, sa.heads, sa.head_dim).transpose(1, 2)
            att = (qq @ kk.transpose(-1, -2)) / math.sqrt(sa.head_dim)
            att = att.masked_fill(~mask[:, None, None, :], torch.finfo(att.dtype).min).softmax(-1)
            x = sa.merge(x, att @ vv)
            cx = layer.cross_attn
            q = cx.q(x).view(P, Lq, cx.heads, cx.head_dim).transpose(1, 2)  # [P,H,Lq,hd]
            if block is not None:
                NI, T = block
                H, hd = q.shape[1], q.shape[3]
                qb = q.reshape(NI, T, H, Lq, hd).permute(0, 2, 1, 3, 4).reshape(NI, H, T * Lq, hd)
                if tokens is not None:
                    c = _attend_through_weights(cx, qb, tokens)
                else:
                    c, _ = _attend(qb, *kv[j])
                c = c.view(NI, H, T, Lq, hd).permute(0, 2, 1, 3, 4).reshape(P, H, Lq, hd)
            else:
                k, v = kv[j]
                c, _ = _attend(q, k.index_select(0, image_index), v.index_select(0, image_index))
            h = layer.feed_forward(cx.merge(x, c.to(x.dtype)))
        return run_fp32(self.head, h[:, 0]).squeeze(-1)

    def forward(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        grid: torch.Tensor | None,
        mid: torch.Tensor,
    ) -> torch.Tensor:
        """Scores of aligned pairs: text i with image i -> [P]."""
        idx = torch.arange(len(states))
        return self.score_pairs(self.text_state(states, lengths), self.image_kv(grid, mid), idx, idx)

    @torch.no_grad()
    def score_texts_images(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        grid: torch.Tensor | None,
        mid: torch.Tensor,
        text_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        batch_pairs: int = 2048,
        keep_weights: bool = False,
    ):
        """Inference helper under bf16 autocast: pairs (text_index, image_index) over these texts and images,
        or every text with every image when both are None ([T, NI]). Returns float32 scores (and the
        word-to-region maps [P, L, 196] with keep_weights)."""
        with autocast():
            text = self.text_state(states, lengths)
            if text_index is None:
                return self.score(text, self.image_state(grid, mid)).float()
            kv = self.image_kv(grid, mid)
            scores, maps = [], []
            for s in range(0, len(text_index), batch_pairs):
                r = self.score_pairs(
                    text, kv, text_index[s : s + batch_pairs], image_index[s : s + batch_pairs], keep_weights
                )
                if keep_weights:
                    scores.append(r[0])
                    maps.append(self.attention_maps(r[1]))
                else:
                    scores.append(r)
        scores = torch.cat(scores).float()
        return (scores, torch.cat(maps)) if keep_weights else scores

    # -- explanations ----------------------------------------------------------------------------------
    def attention_maps(self, weights: torch.Tensor) -> torch.Tensor:
        """Word-to-region weights of the first cross-attention (the one every word queries), heads averaged,
        [P, L, Lk] -> maps [P, L, 196] on the 14x14 grid: the 7x7 grid's attention is spread over its 2x2
        block of 14x14 cells, and each row sums to 1."""
        c = self.config
        w = weights.float()
        n_mid = c.mid_side**2
        maps = w[..., :n_mid]
        if c.use_grid:
            P, L = w.shape[:2]
            g = w[..., n_mid:].reshape(P, L, c.grid_side, c.grid_side)
            rep = c.mid_side // c.grid_side
            g = g.repeat_interleave(rep, -1).repeat_interleave(rep, -2) / (rep * rep)
            maps = maps + g.reshape(P, L, n_mid)
        return maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
