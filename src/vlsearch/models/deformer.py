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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.errors import CheckpointError, VLSearchError
from vlsearch.models.fast import ConceptChannel, FastConfig, fuse_concepts, fused_cosine
from vlsearch.models.layers import (
    TransformerLayer,
    image_tower,
    masked_mean,
    mean_max_pool,
    minilm_upper_layers,
)
from vlsearch.models.states import ImageTokens, TextTokens
from vlsearch.precision import autocast, fp32_head, run_fp32

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
    image_grid: int = 4  # image tokens per side (adaptive average pool of the 7x7 map); + 1 global token
    embed_dim: int = 256  # decomposed embedding size
    init_temperature: float = 0.05
    # ITM head: "mlp" (MLP on [text CLS, mean text, mean image] of the joint output) or "sim+mlp" (the
    # same MLP plus the scaled cosine of the jointly encoded text and image halves, projected by the
    # embedding heads: at init the joint score is a dual-encoder score of cross-attended features)
    itm_head: str = "sim+mlp"
    # joint self-attention = softmax over the query's own modality + gate * softmax over the other one
    # (one gate per layer and head, tanh(param), 0 at init: the joint model starts as its own
    # decomposition and learns how much cross-modal interaction to add); False: one softmax over all
    cross_gate: bool = True
    global_hidden: int = 2048  # MLP width of the global image token (0: linear)
    # image embedding = image_embed(pooled image tokens) + a Fast-style tower on the pooled grid
    # (LayerNorm, MLP + linear skip; same layout as FastModel's, so a Fast checkpoint can initialise it)
    image_tower: bool = True
    image_tower_hidden: int = 2048
    # re-ranking a dual encoder's top-K with this joint model (`vlsearch eval --rerank K --rerank-model`):
    # fused = dual cosine + fusion_weight * ITM logit (t2i; fusion_weight_i2t for i2t), as for the Slow model
    fusion_weight: float = 1.0
    fusion_weight_i2t: float = 1.0
    # The Fast model's concept channel (models/fast.py ConceptChannel), copied with a Fast warm start:
    # decomposed vectors are fused exactly as Fast's are, and the joint "sim+mlp" score fuses the same
    # concept cosine into its stream cosine. Frozen; the same fields as FastConfig's.
    concepts: bool = False
    concept_weight: float = 0.0
    concept_temperature: float = 1.0
    concept_topk: int = 0
    concept_prompts: str = "single"
    concept_classes_sha256: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise VLSearchError(f"deformer mode must be one of {MODES}, not {self.mode!r}")
        if self.itm_head not in ("mlp", "sim+mlp"):
            raise VLSearchError(f"deformer itm_head must be 'mlp' or 'sim+mlp', not {self.itm_head!r}")

    def aligned_with_fast(self, fast_config) -> DeformerConfig:
        """This config with the text layers, embedding size and image tower of a Fast model, so
        ``init_from_fast`` can copy its weights (a warm start fixes these shapes)."""
        return replace(
            self,
            split_layer=fast_config.text_split_layer,
            n_layers=fast_config.text_layers,
            embed_dim=fast_config.embed_dim,
            image_tower=True,
            image_tower_hidden=fast_config.image_hidden,
            concepts=bool(fast_config.concepts),
            concept_weight=fast_config.concept_weight if fast_config.concepts else 0.0,
            concept_temperature=fast_config.concept_temperature,
            concept_topk=fast_config.concept_topk,
            concept_prompts=fast_config.concept_prompts,
            concept_classes_sha256=fast_config.concept_classes_sha256,
        )

    def concept_config(self) -> FastConfig:
        """The FastConfig a ConceptChannel reads (its text layers and class-list fields)."""
        return FastConfig(
            text_split_layer=self.split_layer,
            text_dim=self.dim,
            image_dim=self.image_dim,
            concepts=True,
            concept_weight=self.concept_weight,
            concept_temperature=self.concept_temperature,
            concept_topk=self.concept_topk,
            concept_prompts=self.concept_prompts,
            concept_classes_sha256=self.concept_classes_sha256,
        )

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
        if config.global_hidden:
            self.global_proj = nn.Sequential(
                nn.Linear(2 * config.image_dim, config.global_hidden),
                nn.GELU(),
                nn.Linear(config.global_hidden, D),
            )
        else:
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
        if config.image_tower:
            self.tower_norm, self.tower_mlp, self.tower_skip = image_tower(
                2 * config.image_dim, config.image_tower_hidden, config.embed_dim
            )
        self.cross_gate = nn.Parameter(torch.zeros(config.n_layers, config.heads))
        # ITM head on the pooled joint output: [text CLS, mean text, mean image, mean text * mean image]
        self.itm_head = fp32_head(nn.Sequential(nn.Linear(4 * D, D), nn.GELU(), nn.Linear(D, 1)))
        # decomposed embeddings (also trained in joint mode, as the multi-task contrastive term)
        self.image_embed = nn.Linear(D, config.embed_dim)
        self.text_embed = nn.Linear(D, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        if config.itm_head == "sim+mlp":  # start as the dual score (a small MLP term, so it gets gradient)
            nn.init.normal_(self.itm_head[-1].weight, std=1e-3)
            nn.init.zeros_(self.itm_head[-1].bias)
        # filled by init_from_fast (or the checkpoint): never built from the backbone here
        self.concept = ConceptChannel(config.concept_config(), False) if config.concepts else None
        self.use_concepts = True  # runtime switch, as FastModel's (an index built with --no-concepts)

    @property
    def concepts_active(self) -> bool:
        return self.concept is not None and self.config.concept_weight > 0 and self.use_concepts

    def requires_grad_(self, requires_grad: bool = True) -> DeformerModel:
        """As nn.Module's, but the concept channel stays frozen (it is the backbone's, not ours)."""
        super().requires_grad_(requires_grad)
        if self.concept is not None:
            self.concept.requires_grad_(False)
        return self

    def image_embedding(self, pooled: torch.Tensor, img: ImageTokens) -> torch.Tensor:
        """Normalised image embedding from the pooled image-token output [B,D] (+ the image tower)."""
        e = self.image_embed(pooled).float()
        if img.tower is not None:
            e = e + img.tower.float()
        return F.normalize(e, dim=-1)

    @torch.no_grad()
    def init_from_fast(self, fast) -> None:
        """Warm start from a trained FastModel: its text tower becomes the shared layers and text head,
        its image tower this model's image tower; the image-token head starts at zero, so the decomposed
        model starts as exactly that Fast model (and the joint one, with closed gates, as its scorer)."""
        fc, c = fast.config, self.config
        if (fc.text_split_layer, fc.text_layers, fc.embed_dim) != (c.split_layer, c.n_layers, c.embed_dim):
            raise CheckpointError(
                "the Fast model's text tower does not match this deformer's layers/embed_dim: warm-start from"
                " a Fast checkpoint of the same shape, or train with init_from='minilm'"
            )
        if not c.image_tower or fc.image_pool != "mean+max" or fc.image_hidden != c.image_tower_hidden:
            raise CheckpointError(
                "the Fast model's image tower does not match this deformer's image tower: warm-start from"
                " a Fast checkpoint of the same shape, or train with init_from='minilm'"
            )
        if fc.concept_input:
            raise CheckpointError(
                "the Fast model's image tower reads the concept vector (concept_input): warm-start from a Fast"
                " checkpoint without it"
            )
        if bool(fc.concepts) != c.concepts:
            raise CheckpointError(
                "the Fast model's concept channel does not match this deformer's config: build the config"
                " with aligned_with_fast"
            )
        if self.concept is not None:
            self.concept.load_state_dict(fast.concept.state_dict())
        self.layers.load_state_dict(fast.text_layers.state_dict())
        self.text_embed.load_state_dict(fast.text_proj.state_dict())
        self.tower_norm.load_state_dict(fast.image_norm.state_dict())
        self.tower_mlp.load_state_dict(fast.image_mlp.state_dict())
        self.tower_skip.load_state_dict(fast.image_skip.state_dict())
        self.logit_scale.copy_(fast.logit_scale)
        nn.init.zeros_(self.image_embed.weight)
        nn.init.zeros_(self.image_embed.bias)

    # -- mode -----------------------------------------------------------------------------------------
    @property
    def is_pair_scorer(self) -> bool:
        return self.config.mode == "joint"

    def set_mode(self, mode: str) -> DeformerModel:
        if mode not in MODES:
            raise VLSearchError(f"deformer mode must be one of {MODES}, not {mode!r}")
        self.config.mode = mode
        return self

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    # -- tokens ---------------------------------------------------------------------------------------
    def image_tokens(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> ImageTokens:
        """grid [B,49,1280] (+ mid [B,196,C]) -> [B, g*g+1, D] image tokens (global token first) and the
        image tower's embedding."""
        cfg = self.config
        grid = grid.float()
        B = grid.shape[0]
        pooled = mean_max_pool(grid)
        tower = None
        if cfg.image_tower:
            x = self.tower_norm(pooled)
            tower = self.tower_mlp(x) + self.tower_skip(x)
        glob = self.global_proj(self.global_norm(pooled))
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
        concept = self.concept.image(grid) if self.concepts_active else None
        return ImageTokens(self.image_ln(x), tower, concept)

    def text_tokens(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B,L,384], lengths [B] -> (tokens [B,L,D], mask [B,L] True = real token)."""
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        return states.float() + self.text_type, mask

    def text_concept(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """[B,384] concept-space query vectors of these captions, or None when the channel is off."""
        return self.concept.text(states, lengths) if self.concepts_active else None

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x

    # -- joint mode: the early-interaction pair scorer -------------------------------------------------
    def joint_logits(
        self,
        img: ImageTokens,
        txt_tok: torch.Tensor,
        txt_mask: torch.Tensor,
        txt_concept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Aligned rows of image tokens [B,Ni,D] and text tokens [B,L,D] (+ mask, + the captions'
        ``text_concept`` when the channel is on) -> ITM logits [B]."""
        L = txt_tok.shape[1]
        x = torch.cat([txt_tok, img.tokens.to(txt_tok.dtype)], 1)
        mask = torch.cat([txt_mask, torch.ones(img.tokens.shape[:2], dtype=torch.bool)], 1)
        if self.config.cross_gate:
            is_img = torch.arange(x.shape[1]) >= L
            same = is_img[:, None] == is_img[None, :]  # [S,S] query and key of one modality
            for j, layer in enumerate(self.layers):
                x = gated_joint_layer(layer, x, mask, same, torch.tanh(self.cross_gate[j]))
        else:
            x = self.run_layers(x, mask)
        t, i = x[:, :L], x[:, L:]
        t_mean, i_mean = masked_mean(t, txt_mask), i.mean(1)
        logit = run_fp32(self.itm_head, torch.cat([t[:, 0], t_mean, i_mean, t_mean * i_mean], -1)).squeeze(-1)
        if self.config.itm_head == "sim+mlp":
            te = F.normalize(self.text_embed(t_mean).float(), dim=-1)
            ie = self.image_embedding(i_mean, img)
            cosine = (te * ie).sum(-1)
            if self.concepts_active:  # the decomposed score's fusion, on the joint cosine
                if txt_concept is None or img.concept is None:
                    raise ValueError("this deformer fuses concepts: pass the captions' text_concept")
                cosine = fused_cosine(cosine, txt_concept, img.concept, self.config.concept_weight)
            logit = logit + self.scale * cosine
        return logit

    def joint_logits_bucketed(
        self,
        img_tok: ImageTokens,
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
            txt = self.text_state(states[rows, :L], lengths[rows])
            out.append(self.joint_logits(img_tok[rows], txt.tokens, txt.mask, txt.concept))
        return torch.cat(out)[torch.argsort(order)]

    def score_pairs(
        self, grid: torch.Tensor, mid: torch.Tensor | None, states: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits [B] of aligned (image row b, caption row b) pairs; higher = better match."""
        L = max(1, int(lengths.max())) if len(lengths) else 1
        txt = self.text_state(states[:, :L], lengths)
        return self.joint_logits(self.image_tokens(grid, mid), txt.tokens, txt.mask, txt.concept)

    # the PairScorer contract (models/contracts.py): image tokens once per image, text tokens once per
    # text; the joint layers then run once per pair (early interaction: nothing else can be shared)
    def image_state(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> ImageTokens:
        return self.image_tokens(grid, mid)

    def text_state(self, states: torch.Tensor, lengths: torch.Tensor) -> TextTokens:
        return TextTokens(*self.text_tokens(states, lengths), self.text_concept(states, lengths))

    def score(self, text: TextTokens, image: ImageTokens) -> torch.Tensor:
        return self.score_tokens_grid(image, text.tokens, text.mask, txt_concept=text.concept)

    def score_tokens_grid(
        self,
        img_tok: ImageTokens,
        txt_tok: torch.Tensor,
        txt_mask: torch.Tensor,
        batch: int = 256,
        txt_concept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All pairs of precomputed tokens: images [Ni,..] x captions [Nt,..] (+ their text_concept)
        -> logits [Nt, Ni]."""
        nt, ni = len(txt_tok), len(img_tok)
        out = torch.empty(nt, ni)
        ti, ii = torch.meshgrid(torch.arange(nt), torch.arange(ni), indexing="ij")
        ti, ii = ti.reshape(-1), ii.reshape(-1)
        for s in range(0, len(ti), batch):
            t, i = ti[s : s + batch], ii[s : s + batch]
            m = txt_mask[t]
            L = max(1, int(m.sum(1).max()))
            concept = None if txt_concept is None else txt_concept[t]
            out.view(-1)[s : s + batch] = self.joint_logits(
                img_tok[i], txt_tok[t, :L], m[:, :L], concept
            ).float()
        return out

    @torch.no_grad()
    def score_texts_images(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        grid: torch.Tensor,
        mid: torch.Tensor | None,
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
        with autocast():
            img = self.image_tokens(grid, mid)
            if text_index is None:
                txt = self.text_state(states, lengths)
                return self.score_tokens_grid(img, txt.tokens, txt.mask, batch_pairs, txt.concept)
            text_index, image_index = torch.as_tensor(text_index), torch.as_tensor(image_index)
            concepts = self.text_concept(states, lengths)  # once per text, not once per pair
            out = torch.empty(len(text_index))
            order = torch.argsort(lengths[text_index], stable=True)  # similar lengths share a batch
            for s in range(0, len(order), batch_pairs):
                p = order[s : s + batch_pairs]
                t = text_index[p]
                L = max(1, int(lengths[t].max()))
                txt, mask = self.text_tokens(states[t, :L], lengths[t])
                concept = None if concepts is None else concepts[t]
                out[p] = self.joint_logits(img[image_index[p]], txt, mask, concept).float()
            return out

    # -- decomposed mode: the same layers on one modality at a time ------------------------------------
    @property
    def embed_dim(self) -> int:
        """The DualEncoder contract's width (models/contracts.py), of the decomposed streams, plus the
        concept space when it is fused in (as FastModel's)."""
        return self.config.embed_dim + (self.config.dim if self.concepts_active else 0)

    def encode_image(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """grid [B,49,1280] (+ mid [B,196,C]) -> [B, embed_dim] unit vectors (image stream alone)."""
        img = self.image_tokens(grid, mid)
        e = self.image_embedding(self.run_layers(img.tokens, None).mean(1), img)
        return e if img.concept is None else fuse_concepts(e, img.concept, self.config.concept_weight)

    def encode_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B,L,384] (MiniLM after split_layer layers), lengths [B] -> [B, embed_dim] unit vectors."""
        # trim the batch's padding, except in an export: a traced slice would cut every query of the
        # exported graph to the example's length (the padding is masked, so the result is the same)
        if not torch.onnx.is_in_onnx_export():
            states = states[:, : max(1, int(lengths.max())) if len(lengths) else 1]
        e = self.stream_text(states, lengths)
        concept = self.text_concept(states, lengths)
        return e if concept is None else fuse_concepts(e, concept, self.config.concept_weight)

    def stream_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The text stream alone, without the concept channel: [B, config.embed_dim] unit vectors."""
        txt, mask = self.text_tokens(states, lengths)
        h = self.run_layers(txt, mask)
        return F.normalize(self.text_embed(masked_mean(h, mask)).float(), dim=-1)


def gated_joint_layer(
    layer: TransformerLayer, x: torch.Tensor, mask: torch.Tensor, same: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """One TransformerLayer over a joint image+text sequence with modality-factorised attention.

    The layer's own Q/K/V/output weights; each query attends with one softmax over the keys of its own
    modality (exactly what the layer computes on that modality alone) plus ``gate`` [heads] times a softmax
    over the keys of the other modality. x [B,S,D], mask [B,S] (True = real token), same [S,S] bool.
    """
    att = layer.self_attn
    scores, v = att.scores_values(x, x)
    low = torch.finfo(scores.dtype).min
    keys = mask[:, None, None, :]
    intra = scores.masked_fill(~(keys & same), low).softmax(-1)
    inter = scores.masked_fill(~(keys & ~same), low).softmax(-1)
    weights = intra + gate.to(intra.dtype)[None, :, None, None] * inter
    return layer.feed_forward(att.merge(x, weights @ v))
