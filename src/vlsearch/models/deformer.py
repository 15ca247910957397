"""VLDeformer (Zhang et al. 2021, arXiv 2110.11338): one early-interaction transformer, two ways to run it.

* ``mode="joint"``: image tokens (the EfficientNet-Lite 7x7 grid, optionally with the 14x14 ``mid`` map
  folded onto the same cells, projected to 384-d, plus a global image token) and text tokens (MiniLM
  layer-4 states) form ONE sequence with modality and position embeddings; the layers (initialised from
  MiniLM's upper layers) attend jointly over it and an image-text-matching (ITM) head scores the pooled
  output. Every (caption, image) pair is a forward pass: it is a pair scorer (``is_pair_scorer``).
* ``mode="decomposed"``: the *same* layers run on the text tokens alone and on the image tokens alone;
  the pooled, projected, normalised outputs are a dual encoder with the Fast interface
  (``encode_image(grid, mid)``, ``encode_text(states, lengths)``, ``config.embed_dim``), so galleries
  are embedded once and indexed.

Both modes hold exactly the same parameters: the decomposed model is the joint model's checkpoint with
``mode`` switched (and fine-tuned contrastively on a small target set, see ``training/deformer.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.models.layers import TransformerLayer, masked_mean, minilm_upper_layers

MODES = ("joint", "decomposed")


@dataclass
class DeformerConfig:
    mode: str = "joint"  # "joint" (pair scorer, ITM head) or "decomposed" (dual encoder)
    dim: int = 384
    heads: int = 12
    ffn: int = 1536
    split_layer: int = 4  # the cached text states are MiniLM after this many layers
    n_layers: int = 2  # MiniLM layers split_layer.. as initialisation (beyond MiniLM's depth: fresh)
    image_dim: int = 1280
    mid_dim: int = 112
    use_mid: bool = False  # fold the 14x14 map (2x2 space-to-depth) onto the 7x7 cells
    image_grid: int = 7  # image tokens per side (adaptive average pool of the 7x7 map); + 1 global token
    embed_dim: int = 256  # decomposed embedding size
    init_temperature: float = 0.05
    # ITM head: "mlp" (MLP on [text CLS, mean text, mean image] of the joint output) or "sim+mlp" (the
    # same MLP plus the scaled cosine of the jointly encoded text and image halves, projected by the
    # embedding heads: at init the joint score is a dual-encoder score of cross-attended features)
    itm_head: str = "sim+mlp"
    # re-ranking a dual encoder's top-K with this joint model (`vlsearch eval --rerank K --rerank-model`):
    # fused = dual cosine + fusion_weight * ITM logit (t2i; fusion_weight_i2t for i2t), as for the Slow model
    fusion_weight: float = 1.0
    fusion_weight_i2t: float = 1.0

    def __post_init__(self):
        from vlsearch.errors import VLSearchError

        if self.mode not in MODES:
            raise VLSearchError(f"deformer mode must be one of {MODES}, not {self.mode!r}")
        if self.itm_head not in ("mlp", "sim+mlp"):
            raise VLSearchError(f"deformer itm_head must be 'mlp' or 'sim+mlp', not {self.itm_head!r}")

    @property
    def n_image_tokens(self) -> int:
        return self.image_grid * self.image_grid + 1


class DeformerModel(nn.Module):
    model_type = "deformer"

    def __init__(self, config: DeformerConfig, init_from_pretrained: bool = True):
        super().__init__()
        self.config = config
        D = config.dim
        # image token embedding: per-cell projection + 2-D position + modality, then LayerNorm (BERT style)
        self.grid_norm = nn.LayerNorm(config.image_dim)
        self.grid_proj = nn.Linear(config.image_dim, D)
        if config.use_mid:
            self.mid_norm = nn.LayerNorm(4 * config.mid_dim)
            self.mid_proj = nn.Linear(4 * config.mid_dim, D)
        self.global_norm = nn.LayerNorm(2 * config.image_dim)
        self.global_proj = nn.Linear(2 * config.image_dim, D)
        self.image_pos = nn.Parameter(torch.zeros(config.n_image_tokens, D))
        self.image_type = nn.Parameter(torch.zeros(D))
        self.text_type = nn.Parameter(torch.zeros(D))  # text states already carry MiniLM positions
        self.image_ln = nn.LayerNorm(D, eps=1e-12)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.image_type, std=0.02)
        if init_from_pretrained:
            self.layers = minilm_upper_layers(config.split_layer, config.n_layers)
        else:
            self.layers = nn.ModuleList(
                TransformerLayer(D, config.heads, config.ffn) for _ in range(config.n_layers)
            )
        # ITM head on the pooled joint output: [text CLS, mean text, mean image]
        self.itm_head = nn.Sequential(nn.Linear(3 * D, D), nn.GELU(), nn.Linear(D, 1))
        # decomposed embeddings (also trained in joint mode, as the multi-task contrastive term)
        self.image_embed = nn.Linear(D, config.embed_dim)
        self.text_embed = nn.Linear(D, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        if config.itm_head == "sim+mlp":
            nn.init.zeros_(self.itm_head[-1].weight)
            nn.init.zeros_(self.itm_head[-1].bias)

    # -- mode -----------------------------------------------------------------------------------------
    @property
    def is_pair_scorer(self) -> bool:
        return self.config.mode == "joint"

    def set_mode(self, mode: str) -> DeformerModel:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.config.mode = mode
        return self

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    # -- tokens ---------------------------------------------------------------------------------------
    def image_tokens(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """grid [B,49,1280] (+ mid [B,196,C]) -> [B, g*g+1, D] image tokens (global token first)."""
        cfg = self.config
        grid = grid.float()
        B = grid.shape[0]
        glob = self.global_proj(self.global_norm(torch.cat([grid.mean(1), grid.amax(1)], -1)))
        cells = grid
        if cfg.image_grid != 7:
            g = grid.transpose(1, 2).reshape(B, -1, 7, 7)
            cells = F.adaptive_avg_pool2d(g, cfg.image_grid).flatten(2).transpose(1, 2)
        tok = self.grid_proj(self.grid_norm(cells))
        if cfg.use_mid:
            if mid is None:
                raise ValueError("this deformer uses the 14x14 `mid` map: pass mid features")
            m = mid.float().transpose(1, 2).reshape(B, -1, 14, 14)
            m = F.pixel_unshuffle(m, 2)  # [B, 4C, 7, 7]
            if cfg.image_grid != 7:
                m = F.adaptive_avg_pool2d(m, cfg.image_grid)
            tok = tok + self.mid_proj(self.mid_norm(m.flatten(2).transpose(1, 2)))
        x = torch.cat([glob[:, None], tok], 1) + self.image_pos + self.image_type
        return self.image_ln(x)

    def text_tokens(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B,L,384], lengths [B] -> (tokens [B,L,D], mask [B,L] True = real token)."""
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        return states.float() + self.text_type, mask

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x

    # -- joint mode: the early-interaction pair scorer -------------------------------------------------
    def joint_logits(
        self, img_tok: torch.Tensor, txt_tok: torch.Tensor, txt_mask: torch.Tensor
    ) -> torch.Tensor:
        """Aligned rows of image tokens [B,Ni,D] and text tokens [B,L,D] (+ mask) -> ITM logits [B]."""
        L = txt_tok.shape[1]
        x = torch.cat([txt_tok, img_tok.to(txt_tok.dtype)], 1)
        mask = torch.cat([txt_mask, torch.ones(img_tok.shape[:2], dtype=torch.bool)], 1)
        x = self.run_layers(x, mask)
        t, i = x[:, :L], x[:, L:]
        t_mean, i_mean = masked_mean(t, txt_mask), i.mean(1)
        logit = self.itm_head(torch.cat([t[:, 0], t_mean, i_mean], -1)).squeeze(-1).float()
        if self.config.itm_head == "sim+mlp":
            te = F.normalize(self.text_embed(t_mean).float(), dim=-1)
            ie = F.normalize(self.image_embed(i_mean).float(), dim=-1)
            logit = logit + self.scale * (te * ie).sum(-1)
        return logit

    def joint_logits_bucketed(
        self,
        img_tok: torch.Tensor,
        states: torch.Tensor,
        lengths: torch.Tensor,
        chunk: int = 64,
    ) -> torch.Tensor:
        """Like ``joint_logits`` on aligned rows of image tokens and raw text states, but the rows are
        sorted by caption length and run in chunks each padded only to its own longest caption (the same
        logits, less padding). Differentiable; returns float32 [B] in the input order."""
        order = torch.argsort(lengths, stable=True)
        out = []
        for s in range(0, len(order), chunk):
            rows = order[s : s + chunk]
            L = max(1, int(lengths[rows].max()))
            txt, mask = self.text_tokens(states[rows, :L], lengths[rows])
            out.append(self.joint_logits(img_tok[rows], txt, mask))
        return torch.cat(out)[torch.argsort(order)]

    def score_pairs(
        self, grid: torch.Tensor, mid: torch.Tensor | None, states: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits [B] of aligned (image row b, caption row b) pairs; higher = better match."""
        L = max(1, int(lengths.max())) if len(lengths) else 1
        txt, mask = self.text_tokens(states[:, :L], lengths)
        return self.joint_logits(self.image_tokens(grid, mid), txt, mask)

    def score_tokens_grid(
        self,
        img_tok: torch.Tensor,
        txt_tok: torch.Tensor,
        txt_mask: torch.Tensor,
        batch: int = 256,
    ) -> torch.Tensor:
        """All pairs of precomputed tokens: images [Ni,..] x captions [Nt,..] -> logits [Nt, Ni]."""
        nt, ni = len(txt_tok), len(img_tok)
        out = torch.empty(nt, ni)
        ti, ii = torch.meshgrid(torch.arange(nt), torch.arange(ni), indexing="ij")
        ti, ii = ti.reshape(-1), ii.reshape(-1)
        for s in range(0, len(ti), batch):
            t, i = ti[s : s + batch], ii[s : s + batch]
            m = txt_mask[t]
            L = max(1, int(m.sum(1).max()))
            out.view(-1)[s : s + batch] = self.joint_logits(img_tok[i], txt_tok[t, :L], m[:, :L]).float()
        return out

    @torch.no_grad()
    def score_texts_images(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        mid: torch.Tensor | None,
        grid: torch.Tensor,
        text_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        batch_pairs: int = 256,
        keep_weights: bool = False,
    ) -> torch.Tensor:
        """The pair-scoring entry point shared with the Slow model (same signature), bf16 autocast.

        Every text with every image ([T, I]) when both indexes are None, else the pairs
        (text_index[p], image_index[p]) -> [P]. Float32 ITM logits. Image and text tokens are computed once
        each; the joint layers then run once per pair (early interaction: nothing else can be shared).
        """
        if keep_weights:
            raise ValueError("the deformer has no word-to-region maps (keep_weights)")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = self.image_tokens(grid, mid)
            if text_index is None:
                txt, mask = self.text_tokens(states, lengths)
                return self.score_tokens_grid(img, txt, mask, batch_pairs)
            text_index, image_index = torch.as_tensor(text_index), torch.as_tensor(image_index)
            out = torch.empty(len(text_index))
            order = torch.argsort(lengths[text_index], stable=True)  # similar lengths share a batch
            for s in range(0, len(order), batch_pairs):
                p = order[s : s + batch_pairs]
                t = text_index[p]
                L = max(1, int(lengths[t].max()))
                txt, mask = self.text_tokens(states[t, :L], lengths[t])
                out[p] = self.joint_logits(img[image_index[p]], txt, mask).float()
            return out

    # -- decomposed mode: the same layers on one modality at a time ------------------------------------
    def encode_image(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """grid [B,49,1280] (+ mid [B,196,C]) -> [B, embed_dim] unit vectors (image stream alone)."""
        h = self.run_layers(self.image_tokens(grid, mid), None)
        return F.normalize(self.image_embed(h.mean(1)).float(), dim=-1)

    def encode_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B,L,384] (MiniLM after split_layer layers), lengths [B] -> [B, embed_dim] unit vectors."""
        L = max(1, int(lengths.max())) if len(lengths) else 1
        txt, mask = self.text_tokens(states[:, :L], lengths)
        h = self.run_layers(txt, mask)
        return F.normalize(self.text_embed(masked_mean(h, mask)).float(), dim=-1)


# -- cost: per-query work of the two modes ---------------------------------------------------------------
@torch.no_grad()
def measure_query_cost(
    joint: DeformerModel,
    decomposed: DeformerModel,
    grid: torch.Tensor,
    mid: torch.Tensor | None,
    states: torch.Tensor,
    lengths: torch.Tensor,
    gallery_sizes=(1000, 10_000, 100_000),
    joint_measured: int = 1000,
    index_kind: str = "flat",
    batch: int = 256,
    seed: int = 0,
) -> list[dict]:
    """Per text query cost of the joint model (score every gallery image) vs the decomposed one, one run.

    ``grid``/``mid`` are real gallery images (e.g. the 1,000 dev images), ``states``/``lengths`` real
    caption queries (each is timed, the mean reported). Both models get their offline work for free: the
    joint model's image tokens and the decomposed model's gallery embeddings are computed before timing.

    * joint, per query: one early-interaction forward pass per gallery image, timed over the first
      ``joint_measured`` images (all of them at 1k) and scaled linearly beyond (labelled ``extrapolated``;
      the forward passes are independent, so the cost is linear in the gallery by construction).
    * decomposed, per query: encode the caption once + top-10 search of a ``index_kind`` faiss index
      over the gallery embeddings (the real images, topped up with random unit vectors for the
      synthetic 10k/100k galleries), both timed at every size.
    """
    import numpy as np

    from vlsearch.index.vectors import make_vector_index

    joint.eval()
    decomposed.eval()
    n_real = len(grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = min(joint_measured, max(gallery_sizes))
        reps = -(-m // n_real)
        img_tok = joint.image_tokens(grid, mid).repeat(reps, 1, 1)[:m]
        real_emb = torch.cat(
            [
                decomposed.encode_image(grid[s : s + batch], None if mid is None else mid[s : s + batch])
                for s in range(0, n_real, batch)
            ]
        ).float()
    real_emb = real_emb.numpy()
    joint_s, encode_s = [], []
    queries = []
    for q in range(len(states)):
        L = int(lengths[q])
        st, ln = states[q : q + 1, :L], lengths[q : q + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            decomposed.encode_text(st, ln)  # warm-up
            t0 = time.perf_counter()
            queries.append(decomposed.encode_text(st, ln).float().numpy())
            encode_s.append(time.perf_counter() - t0)
            txt, mask = joint.text_tokens(st, ln)
            joint.joint_logits(img_tok[:8], txt.expand(8, -1, -1), mask.expand(8, -1))  # warm-up
            t0 = time.perf_counter()
            for s in range(0, m, batch):
                b = min(batch, m - s)
                joint.joint_logits(img_tok[s : s + b], txt.expand(b, -1, -1), mask.expand(b, -1))
            joint_s.append(time.perf_counter() - t0)
    per_pair = float(np.mean(joint_s)) / m
    encode = float(np.mean(encode_s))
    qv = np.concatenate(queries)
    rng = np.random.default_rng(seed)
    rows = []
    for n in gallery_sizes:
        extra = max(0, n - n_real)
        fake = rng.standard_normal((extra, real_emb.shape[1])).astype(np.float32)
        fake /= np.linalg.norm(fake, axis=1, keepdims=True)
        emb = np.concatenate([real_emb[:n], fake])
        index = make_vector_index(emb.shape[1], n, index_kind)
        index.add(emb)
        index.search(qv[:1], 10)  # warm-up
        t0 = time.perf_counter()
        for row in qv:
            index.search(row[None], 10)
        search = (time.perf_counter() - t0) / len(qv)
        joint_ms = 1e3 * per_pair * n
        dec_ms = 1e3 * (encode + search)
        rows.append(
            {
                "gallery": n,
                "synthetic_images": extra,
                "joint_ms_per_query": joint_ms,
                "joint_extrapolated": n > m,
                "decomposed_encode_ms": 1e3 * encode,
                "decomposed_search_ms": 1e3 * search,
                "decomposed_ms_per_query": dec_ms,
                "index": index.kind,
                "speedup": joint_ms / dec_ms,
            }
        )
    return rows
