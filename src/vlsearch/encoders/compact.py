"""Compact re-ranking features (issue 19): what a re-ranker reads per candidate in ~41 KB per image
instead of the full cache's 169 KB, so a million images' maps take 41 GB, and a cold query reads a
quarter of the bytes.

The full cache holds the 7x7 ``grid`` (1280 channels, 88% zeros: ReLU6 outputs) and the 14x14 ``mid``
map (112), both fp16. The grid does not compress by itself (its top 384 principal components keep 72% of
the variance; token cosine 0.82 on dev), but a pair scorer reads it only through a learned projection
(LayerNorm, then a linear map to 384), so a scorer that can (``models/contracts.CompactImages``) names
the *parts* of an image worth storing: the projected grid tokens, the raw mid map, and its frozen Fast
prior's image vector. This module stores parts as int8 with one fp32 scale per token (symmetric:
``round(x / s)``, ``s = max|x| / 127``), in a ``TokenStore`` beside the full cache whose folder is named by
the scorer's digest: another scorer (or another checkpoint) never reads these parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsearch.encoders.store import TokenStore

INT8_MAX = 127.0
SCALE_FLOOR = 1e-30  # an all-zero token still divides by something


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [..., d] and fp32 scales [..., 1], one scale per token (per last-axis row; fp32, as
    fp16 would flush the scales of small-valued tokens to zero)."""
    x = np.asarray(x, np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / INT8_MAX, np.float32(SCALE_FLOOR))
    codes = np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale.astype(np.float32)


def round_trip(x: np.ndarray) -> np.ndarray:
    """What a part comes back as after the compact store (float32)."""
    return dequantize(*quantize(x))


def part_bytes(shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes per image of parts of these [tokens, dim] shapes: int8 codes plus one fp32 scale a token."""
    return sum(n * (d + 4) for n, d in shapes.values())


def compact_store(root: Path, shapes: dict[str, tuple[int, int]], digest: str, meta: dict) -> TokenStore:
    """The compact store for parts of these [tokens, dim] shapes, under ``root/compact-{digest}``."""
    fields: dict[str, tuple[int, str]] = {}
    for name, (_, dim) in shapes.items():
        fields[f"{name}.code"] = (dim, "int8")
        fields[f"{name}.scale"] = (1, "float32")
    return TokenStore(Path(root) / f"compact-{digest}", fields, {"digest": digest, **meta})


def put_parts(store: TokenStore, keys: list[str], parts: dict[str, np.ndarray]) -> None:
    """Quantize and append these images' parts ([N, tokens, dim] each)."""
    arrays: dict[str, list[np.ndarray]] = {}
    for name, x in parts.items():
        codes, scale = quantize(x)
        arrays[f"{name}.code"], arrays[f"{name}.scale"] = list(codes), list(scale)
    store.put(keys, arrays)


def get_parts(store: TokenStore, keys: list[str], names) -> dict[str, np.ndarray]:
    """The dequantized parts of these keys, in order ([N, tokens, dim] float32 each)."""
    return {
        n: dequantize(store.get_stacked(keys, f"{n}.code"), store.get_stacked(keys, f"{n}.scale"))
        for n in names
    }
