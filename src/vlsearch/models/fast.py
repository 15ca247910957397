"""The Fast dual encoder: image and text mapped separately into one normalised space (Miech et al.'s Fast).

Inputs are cached backbone features, so the whole model trains on CPU: the image tower is an MLP on the
pooled EfficientNet-Lite grid; the text tower fine-tunes MiniLM's upper layers on cached lower-layer states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.encoders import concepts as C
from vlsearch.encoders.concepts import concept_distribution, logits_from_grid, sentence_states
from vlsearch.encoders.image import ImageBackbone
from vlsearch.errors import CheckpointError, VLSearchError
from vlsearch.models.hubness import HubnessPrior
from vlsearch.models.layers import (
    TransformerLayer,
    image_tower,
    masked_mean,
    mean_max_pool,
    minilm_upper_layers,
)


@dataclass
class FastConfig:
    embed_dim: int = 256
    image_dim: int = 1280
    image_hidden: int = 2048
    text_split_layer: int = 4
    text_layers: int = 2
    text_dim: int = 384
    init_temperature: float = 0.05
    image_pool: str = "mean+max"
    # Concept channel (vlsearch.encoders.concepts): the backbone's ImageNet classes, named by MiniLM.
    concepts: bool = False  # the channel's buffers are in the checkpoint
    concept_weight: float = 0.0  # zero-shot score added to the Fast score (chosen on dev after training)
    concept_temperature: float = 1.0  # softmax temperature on the ImageNet logits
    concept_topk: int = 0  # keep only the k most likely classes (0: all 1,000)
    # "single" ("a photo of a {}."), "ensemble" (4 prompts x 2 lemmas) or "gloss" ("a photo of a {name},
    # {its WordNet definition}.")
    concept_prompts: str = "single"
    concept_input: bool = False  # image tower also sees the concept vector (needs training)
    concept_classes_sha256: str = ""  # the class list the label embeddings were made from
    # Hubness prior (vlsearch.models.hubness): a bank of captions, its weight chosen on dev after training.
    hubness_bank: int = 0  # captions in the bank (0: no prior in the checkpoint)
    hubness_weight: float = 0.0
    hubness_temperature: float = 0.05  # the model's own temperature when the bank was made
    hubness_offset: float = 0.0  # mean prior over the train images


class FastModel(nn.Module):
    model_type = "fast"

    def __init__(self, config: FastConfig, init_from_pretrained: bool = True):
        super().__init__()
        self.config = config
        pooled = config.image_dim * (2 if config.image_pool == "mean+max" else 1)
        self.concept = ConceptChannel(config, init_from_pretrained) if config.concepts else None
        self.use_concepts = True  # runtime switch (an index built with --no-concepts turns it off)
        self.hubness = (
            HubnessPrior(config.hubness_bank, config.embed_dim, config.text_dim if config.concepts else 0)
            if config.hubness_bank
            else None
        )
        self.use_hubness = True  # runtime switch (eval --no-hubness)
        if config.concept_input:
            if self.concept is None:
                raise CheckpointError(
                    "FastConfig: concept_input needs concepts=True (the tower's input includes the concept vector)"
                )
            pooled += config.text_dim
        self.image_norm, self.image_mlp, self.image_skip = image_tower(
            pooled, config.image_hidden, config.embed_dim
        )
        if init_from_pretrained:
            self.text_layers = minilm_upper_layers(config.text_split_layer, config.text_layers)
        else:
            self.text_layers = nn.ModuleList(
                TransformerLayer(config.text_dim) for _ in range(config.text_layers)
            )
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def pool_image(self, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.float()
        if self.config.image_pool == "mean+max":
            return mean_max_pool(grid)
        return grid.mean(1)

    @property
    def concepts_active(self) -> bool:
        return self.concept is not None and self.config.concept_weight > 0 and self.use_concepts

    @property
    def hubness_active(self) -> bool:
        return self.hubness is not None and self.config.hubness_weight > 0 and self.use_hubness

    @property
    def embed_dim(self) -> int:
        """The DualEncoder contract's width (models/contracts.py): what encode_image returns."""
        return self.output_dim

    @property
    def output_dim(self) -> int:
        """Width of encode_image/encode_text: embed_dim, plus the concept space when it is fused in, plus
        the hubness prior's column when it is on."""
        return (
            self.config.embed_dim
            + (self.config.text_dim if self.concepts_active else 0)
            + (1 if self.hubness_active else 0)
        )

    def encode_image(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """grid [B,49,1280] -> [B,output_dim] unit vectors (Fast, fused with concepts when active)."""
        return self.image_from_inputs(*self.image_inputs(grid))

    def image_inputs(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image tower's parameter-free part: the pooled grid, and the concept vector when the tower
        or the fused score uses it. A trainer that scores the same un-augmented grids every step (the
        distillation teacher) computes these once."""
        use = self.concepts_active or self.config.concept_input
        return self.pool_image(grid), (self.concept.image(grid) if use else None)

    def image_from_inputs(self, pooled: torch.Tensor, concept: torch.Tensor | None) -> torch.Tensor:
        """The trained part of the image tower, on what ``image_inputs`` returned."""
        x = pooled
        if self.config.concept_input:
            x = torch.cat([x, concept.to(x.dtype)], -1)
        x = self.image_norm(x)
        fast = F.normalize(self.image_mlp(x) + self.image_skip(x), dim=-1)
        emb = fuse_concepts(fast, concept, self.config.concept_weight) if self.concepts_active else fast
        return self.with_image_prior(emb) if self.hubness_active else emb

    def hubness_bank(self) -> torch.Tensor:
        """The hubness bank in the current output space (concepts on or off), without the prior column."""
        if not self.concepts_active:
            return self.hubness.bank(None, None)
        w = self.config.concept_weight
        return self.hubness.bank(w, lambda f, c: fuse_concepts(f, c, w))

    def with_image_prior(self, emb: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, D+1]: the image's hubness correction appended (models/hubness.py)."""
        c = self.config
        prior = HubnessPrior.log_prior(emb, self.hubness_bank(), c.hubness_temperature)
        column = -c.hubness_weight * (prior - c.hubness_offset)
        return torch.cat([emb, column[:, None].to(emb.dtype)], -1)

    def encode_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B,L,384] (MiniLM after text_split_layer layers), lengths [B] -> [B,output_dim] unit."""
        emb = self.fast_text(states, lengths)
        if self.concepts_active:
            emb = fuse_concepts(emb, self.concept.text(states, lengths), self.config.concept_weight)
        if self.hubness_active:  # the query side of the prior column: 1
            emb = torch.cat([emb, torch.ones_like(emb[:, :1])], -1)
        return emb

    def fast_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The Fast text tower alone: [B,embed_dim] unit vectors."""
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        h = states.float()
        for layer in self.text_layers:
            h = layer(h, mask)
        return F.normalize(self.text_proj(masked_mean(h, mask)), dim=-1)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


def fuse_concepts(embedding: torch.Tensor, concept: torch.Tensor, weight: float) -> torch.Tensor:
    """[embedding, sqrt(w) concept] / sqrt(1 + w): a dot product of two such vectors is
    (embedding score + w x concept score) / (1 + w), so faiss searches the fused score as it is."""
    return torch.cat([embedding, concept.to(embedding.dtype) * math.sqrt(weight)], -1) / math.sqrt(1 + weight)


def fused_cosine(
    cosine: torch.Tensor, text_concept: torch.Tensor, image_concept: torch.Tensor, weight: float
) -> torch.Tensor:
    """The score two ``fuse_concepts`` vectors give, from its parts: for scorers (the joint deformer) that
    compute the embedding cosine themselves."""
    return (cosine + weight * (text_concept.float() * image_concept.float()).sum(-1)) / (1 + weight)


def set_hubness(model, enabled: bool) -> bool:
    """Switch a model's hubness prior on or off at run time; returns whether it is in the vectors now."""
    if hasattr(model, "use_hubness"):
        model.use_hubness = bool(enabled)
    return bool(getattr(model, "hubness_active", False))


def has_prior_column(model) -> bool:
    """Whether the model's vectors end in the hubness prior's column (models/hubness.py)."""
    return bool(getattr(model, "hubness_active", False))


def set_concepts(model, enabled: bool) -> bool:
    """Switch a model's concept channel on or off at run time (an index records which); returns whether
    it is in the vectors now (False for models without one)."""
    if hasattr(model, "use_concepts"):
        model.use_concepts = bool(enabled)
    return bool(getattr(model, "concepts_active", False))


class ConceptChannel(nn.Module):
    """The frozen zero-shot part: the backbone's ImageNet head on the pooled grid, class-name embeddings,
    and pretrained MiniLM upper layers that embed a query into the same space (from its cached states).
    Kept in the checkpoint (buffers), so scoring never needs the backbone packages' heads again."""

    def __init__(self, config: FastConfig, init_from_pretrained: bool = True):
        super().__init__()
        self.config = config
        if init_from_pretrained:
            self.query_layers = minilm_upper_layers(config.text_split_layer, 6 - config.text_split_layer)
        else:
            self.query_layers = nn.ModuleList(
                TransformerLayer(config.text_dim) for _ in range(6 - config.text_split_layer)
            )
        self.query_layers.requires_grad_(False)
        self.register_buffer("head_weight", torch.zeros(C.N_CLASSES, config.image_dim))
        self.register_buffer("head_bias", torch.zeros(C.N_CLASSES))
        self.register_buffer("labels", torch.zeros(C.N_CLASSES, config.text_dim))
        if init_from_pretrained:
            config.concept_classes_sha256 = C.CLASSES_SHA256
            w, b = C.classifier_head(ImageBackbone().net)
            self.head_weight.copy_(w)
            self.head_bias.copy_(b)
            self.set_prompts(config.concept_prompts)
        else:
            C.class_lemmas(config.concept_classes_sha256 or C.CLASSES_SHA256)  # refuse another class list

    @torch.no_grad()
    def set_prompts(self, kind: str) -> None:
        kinds = {"single": ((C.PROMPT,), 1), "ensemble": (C.PROMPTS, 2), "gloss": ((C.PROMPT,), 1)}
        if kind not in kinds:
            raise VLSearchError(f"concept_prompts must be one of {', '.join(kinds)}, not {kind!r}")
        prompts, names = kinds[kind]
        self.labels.copy_(C.label_embeddings(self.query_layers, prompts, names, gloss=kind == "gloss"))
        self.config.concept_prompts = kind

    def probs(self, grid: torch.Tensor) -> torch.Tensor:
        """[B,49,1280] -> class probabilities [B,1000] (fp32, whatever autocast is in force)."""
        with torch.autocast("cpu", enabled=False):
            logits = logits_from_grid(grid, self.head_weight, self.head_bias)
            return concept_distribution(logits, self.config.concept_temperature, self.config.concept_topk)

    def image(self, grid: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return F.normalize(self.probs(grid) @ self.labels, dim=-1)

    def text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return sentence_states(states, lengths, self.query_layers).float()
