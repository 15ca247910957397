"""The models the bench times: ours (backbones, Fast towers, Slow, deformer) and the peers' encoders.

Peers are built from ``transformers`` configs written out here (no downloads) with random weights: the
speed of a forward pass does not depend on the weights. Our Slow and deformer models are loaded from their
named checkpoints when those exist, else built with random weights (again: speed only); when their modules
are missing they are reported as not available.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from vlsearch.errors import VLSearchError
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast, bf16_linears

# ViT-B/32 as released by OpenAI (Radford et al. 2021): 12 x 768 vision, 12 x 512 text, 77 positions.
CLIP_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    projection_dim=512,
    hidden_act="quick_gelu",
)
CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    projection_dim=512,
    hidden_act="quick_gelu",
)
# BLIP-base retrieval (Li et al. 2022): ViT-B/16 at 384 px (577 tokens) + BERT-base with cross-attention.
BLIP_TEXT = dict(
    vocab_size=30524,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    encoder_hidden_size=768,
)
BLIP_VISION = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=384,
    patch_size=16,
)
BLIP_IMAGE_TOKENS = (384 // 16) ** 2 + 1


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def clip_towers(layers: int | None = None):
    """(vision tower, text tower) of CLIP ViT-B/32 with random weights; ``layers`` shrinks both (quick)."""
    _quiet_transformers()
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    v = dict(CLIP_VISION, num_hidden_layers=layers or CLIP_VISION["num_hidden_layers"])
    t = dict(CLIP_TEXT, num_hidden_layers=layers or CLIP_TEXT["num_hidden_layers"])
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**v)).eval().requires_grad_(False)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**t)).eval().requires_grad_(False)
    return bf16_linears(vision), bf16_linears(text)


def blip_itm(layers: int | None = None):
    """BLIP-base image-text retrieval model (ITM head) with random weights; the vision tower is dropped:
    re-ranking reads the gallery's cached ViT tokens, as ours reads cached backbone features."""
    _quiet_transformers()
    from transformers import BlipConfig, BlipForImageTextRetrieval

    t = dict(BLIP_TEXT, num_hidden_layers=layers or BLIP_TEXT["num_hidden_layers"])
    v = dict(BLIP_VISION, num_hidden_layers=1)  # unused for scoring; keep construction cheap
    model = BlipForImageTextRetrieval(BlipConfig(text_config=t, vision_config=v)).eval().requires_grad_(False)
    model.vision_model = None
    return bf16_linears(model)


def blip_itm_scores(model, input_ids, attention_mask, image_embeds) -> torch.Tensor:
    """ITM match probability logits for aligned (text row, image row) pairs, as BLIP re-ranks its top-k."""
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    out = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    )
    return model.itm_head(out.last_hidden_state[:, 0, :])[:, 1]


@dataclass
class OurModel:
    name: str
    model: torch.nn.Module | None
    source: str  # "checkpoint PATH", "random weights ...", or why it is not available
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.model is not None


def load_ours(
    named: str, module: str, cls_name: str, cfg_name: str, need: str = "score_texts_images", **cfg
) -> OurModel:
    """A named checkpoint if trained, else the architecture with random weights; None if no module."""

    try:
        mod = importlib.import_module(module)
        cls, cfg_cls = getattr(mod, cls_name), getattr(mod, cfg_name)
    except (ImportError, AttributeError) as e:
        return OurModel(named, None, f"not available ({module}.{cls_name}: {type(e).__name__})")
    if not hasattr(cls, need):
        return OurModel(named, None, f"not available ({cls_name} has no {need}())")
    try:
        net, meta, path = load_model(named)
        if not isinstance(net, cls):
            raise VLSearchError(f"{named} is a {meta.get('model_type')} model")
        source = f"checkpoint {path}"
    except VLSearchError as e:
        try:
            net = cls(cfg_cls(**cfg), init_from_pretrained=False)
        except Exception as e2:  # noqa: BLE001 - a model being written may not build yet
            return OurModel(named, None, f"not available ({type(e2).__name__}: {e2})")
        source = f"random weights, speed only (no trained checkpoint: {str(e).split(':')[0]})"
    return OurModel(named, bf16_linears(net.eval().requires_grad_(False)), source)


def slow_model() -> OurModel:
    return load_ours("slow", "vlsearch.models.slow", "SlowModel", "SlowConfig")


def deformer_joint() -> OurModel:
    m = load_ours(
        "deformer-joint", "vlsearch.models.deformer", "DeformerModel", "DeformerConfig", mode="joint"
    )
    if m.available and getattr(m.model.config, "mode", "joint") != "joint" and hasattr(m.model, "set_mode"):
        m.model.set_mode("joint")
    return m


def deformer_decomposed() -> OurModel:
    return load_ours(
        "deformer",
        "vlsearch.models.deformer",
        "DeformerModel",
        "DeformerConfig",
        need="encode_text",
        mode="decomposed",
    )


def pair_scorer_fn(m: OurModel):
    """fn(states [1,L,384], lengths [1], grid [K,49,1280], mid [K,196,C]) -> [K] scores of one text vs K images."""
    model = m.model

    def fn(states, lengths, grid, mid):
        out = model.score_texts_images(states, lengths, grid, mid)
        return out.reshape(-1)

    return fn


def slow_keys_values_fn(m: OurModel):
    """pair_scorer_fn's call the way the Slow model scored one query before it went through the key/value
    weights (models/slow.py): each image's cross-attention keys and values computed, then attended."""
    model = m.model

    def fn(states, lengths, grid, mid):
        with torch.no_grad(), autocast():
            text = model.text_state(states, lengths)
            return model.score_from_keys_values(text, model.image_state(grid, mid)).float().reshape(-1)

    return fn


def n_image_tokens(m: OurModel) -> int | None:
    cfg = getattr(m.model, "config", None)
    return getattr(cfg, "n_image_tokens", None) if cfg is not None else None
