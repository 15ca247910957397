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

from vlsearch.models.layers import image_tower, masked_mean, mean_max_pool, minilm_upper_layers


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


class FastModel(nn.Module):
    model_type = "fast"

    def __init__(self, config: FastConfig, init_from_pretrained: bool = True):
        super().__init__()
        self.config = config
        pooled = config.image_dim * (2 if config.image_pool == "mean+max" else 1)
        self.image_norm, self.image_mlp, self.image_skip = image_tower(
            pooled, config.image_hidden, config.embed_dim
        )
        if init_from_pretrained:
            self.text_layers = minilm_upper_layers(config.text_split_layer, config.text_layers)
        else:
            from vlsearch.models.layers import TransformerLayer

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

    def encode_image(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """grid [B,49,1280] -> [B,D] unit vectors."""
        x = self.image_norm(self.pool_image(grid))
        return F.normalize(self.image_mlp(x) + self.image_skip(x), dim=-1)

    def encode_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B,L,384] (MiniLM after text_split_layer layers), lengths [B] -> [B,D] unit vectors."""
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        h = states.float()
        for layer in self.text_layers:
            h = layer(h, mask)
        return F.normalize(self.text_proj(masked_mean(h, mask)), dim=-1)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)
