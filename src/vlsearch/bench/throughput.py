"""Encoding throughput (images/s, texts/s) and pair-scoring throughput (pairs/s), ours beside peers.

All models run the same way: bf16 autocast over bf16 linear weights (``bf16_linears``, as the search
path runs ours) on a CPU with native bf16, fp32 on one without (``vlsearch.precision``), torch on all cores, inputs already decoded (images as uint8 arrays / pixel tensors,
texts as token ids of real captions), one run side by side. Texts for the peers reuse our captions' token
lengths (speed depends on the lengths, not on the ids).
"""

from __future__ import annotations

import torch

from vlsearch.bench import models as M
from vlsearch.bench.hardware import Floors
from vlsearch.bench.util import count_flops, rate
from vlsearch.encoders.image import ImageBackbone
from vlsearch.encoders.text import TextBackbone
from vlsearch.precision import autocast, inference_copy, use_bf16

RERANK_K = 128  # pairs per call: one query against its top-128, as ALBEF/BLIP re-rank k = 128-256


def _autocast():
    return autocast()


def _precision_note() -> str:
    return "bf16 autocast over bf16 linear weights" if use_bf16() else "fp32 (this CPU has no native bf16)"


def _row(name: str, what: str, r: dict, flops: float, floors: Floors, unit: str, source: str) -> dict:
    floor_per_s = 1e3 / floors.flop_ms(flops) if flops else None
    return {
        "name": name,
        "what": what,
        unit: r["per_s"],
        "best_" + unit: r["best_per_s"],
        "batch": r["items_per_call"],
        "gflops_per_item": flops / 1e9,
        "floor_" + unit: floor_per_s,  # FLOPs at the measured matmul rate of the precision in use
        "fraction_of_floor": r["per_s"] / floor_per_s if floor_per_s else None,
        "weights": source,
    }


@torch.no_grad()
def encoders(data, fast, floors: Floors, quick: bool) -> dict:
    """data: BenchData (real images and captions); fast: the Fast model (its towers are part of ours)."""

    fast = inference_copy(fast)  # as the search path's Embedder runs it
    budget = 1.0 if quick else 6.0
    calls = 1 if quick else 3
    n_img = 8 if quick else 32
    n_txt = 64 if quick else 256
    images = data.image_arrays(n_img)  # uint8 [B,224,224,3]
    captions = data.captions(n_txt)
    rows: dict[str, dict] = {}

    backbone = ImageBackbone()

    def ours_image():
        out = backbone(torch.from_numpy(images))
        with _autocast():
            return fast.encode_image(out["grid"], out["mid"])

    rows["ours_image"] = _row(
        "ours image: EfficientNet-Lite0 + Fast image tower",
        "224 px, grid 7x7x1280 + mid 14x14x112",
        rate(ours_image, n_img, budget, calls),
        count_flops(ours_image) / n_img,
        floors,
        "images_per_s",
        "pretrained backbone + Fast",
    )
    text_bb = TextBackbone()
    tok = text_bb.tokenize(captions)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    lengths = mask.sum(1)

    def ours_text():
        states = text_bb(ids, mask)
        with _autocast():
            return fast.encode_text(states, lengths)

    rows["ours_text"] = _row(
        "ours text: MiniLM L0-3 + Fast text tower (L4-5)",
        f"real captions, {float(lengths.float().mean()):.1f} tokens on average, padded per batch",
        rate(ours_text, n_txt, budget, calls),
        count_flops(ours_text) / n_txt,
        floors,
        "texts_per_s",
        "pretrained backbone + Fast",
    )
    tokenize_ms = 1e3 / rate(lambda: text_bb.tokenize(captions), n_txt, budget / 4, calls)["per_s"]

    vision, text = M.clip_towers(layers=2 if quick else None)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)

    def clip_image():
        with _autocast():
            return vision(pixel_values=pixels).image_embeds

    clip_ids = torch.randint(0, M.CLIP_TEXT["vocab_size"] - 1, ids.shape)

    def clip_text():
        with _autocast():
            return text(input_ids=clip_ids, attention_mask=mask).text_embeds

    depth = " (2 layers: --quick)" if quick else ""
    rows["clip_image"] = _row(
        "CLIP ViT-B/32 image tower" + depth,
        "224 px, 50 tokens x 768, 12 layers",
        rate(clip_image, n_img, budget, calls),
        count_flops(clip_image) / n_img,
        floors,
        "images_per_s",
        "random weights (transformers config)",
    )
    rows["clip_text"] = _row(
        "CLIP ViT-B/32 text tower" + depth,
        "same token lengths as ours, 12 layers x 512",
        rate(clip_text, n_txt, budget, calls),
        count_flops(clip_text) / n_txt,
        floors,
        "texts_per_s",
        "random weights (transformers config)",
    )
    dec = M.deformer_decomposed()
    if dec.available:
        grid = torch.from_numpy(data.grid(n_img)).float()
        mid = torch.from_numpy(data.mid(n_img)).float()
        states = text_bb(ids, mask)

        def dec_image():
            with _autocast():
                return dec.model.encode_image(grid, mid)

        def dec_text():
            with _autocast():
                return dec.model.encode_text(states, lengths)

        # the backbones are shared with Fast: end to end = backbone (measured alone) + the deformer tower
        def backbone_only():
            return backbone(torch.from_numpy(images))

        def text_backbone_only():
            return text_bb(ids, mask)

        bb_img = rate(backbone_only, n_img, budget / 2, calls)["per_s"]
        bb_txt = rate(text_backbone_only, n_txt, budget / 2, calls)["per_s"]
        r_img, r_txt = rate(dec_image, n_img, budget, calls), rate(dec_text, n_txt, budget, calls)
        rows["deformer_image"] = {
            "name": "ours: EfficientNet-Lite0 + deformer (decomposed) image stream",
            "what": "backbone and tower timed apart, combined",
            "images_per_s": 1.0 / (1.0 / bb_img + 1.0 / r_img["per_s"]),
            "tower_images_per_s": r_img["per_s"],
            "gflops_per_item": rows["ours_image"]["gflops_per_item"] + count_flops(dec_image) / n_img / 1e9,
            "weights": dec.source,
        }
        rows["deformer_text"] = {
            "name": "ours: MiniLM L0-3 + deformer (decomposed) text stream",
            "what": "backbone and tower timed apart, combined",
            "texts_per_s": 1.0 / (1.0 / bb_txt + 1.0 / r_txt["per_s"]),
            "tower_texts_per_s": r_txt["per_s"],
            "gflops_per_item": count_flops(text_backbone_only) / n_txt / 1e9
            + count_flops(dec_text) / n_txt / 1e9,
            "weights": dec.source,
        }
    else:
        rows["deformer_image"] = {
            "name": "ours: deformer (decomposed)",
            "available": False,
            "weights": dec.source,
        }
    ratios = {
        "image_ours_over_clip": rows["ours_image"]["images_per_s"] / rows["clip_image"]["images_per_s"],
        "text_ours_over_clip": rows["ours_text"]["texts_per_s"] / rows["clip_text"]["texts_per_s"],
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "tokenize_ms_per_text": tokenize_ms,
        "batch_images": n_img,
        "batch_texts": n_txt,
        "precision": _precision_note() + " for all models",
        "note": "images already decoded to 224x224 uint8 (JPEG decode excluded for all)",
    }


PAIR_TARGET = 2.0  # x the Slow pairs/s of the path before (issue 19)


def pair_targets(section: dict | None) -> list[str]:
    """The issue-19 line for Slow pair throughput: this run's path against the path before, same run."""
    ratio = (section or {}).get("ratios", {}).get("slow_over_its_path_before")
    if ratio is None:
        return []
    rows = section["rows"]
    return [
        f"Slow pairs/s >= {PAIR_TARGET:.0f}x the path before (same run, 1 text x {section['k']} images): "
        f"{'MET' if ratio >= PAIR_TARGET else 'NOT MET'} ({rows['slow_keys_values']['pairs_per_s']:,.0f} -> "
        f"{rows['slow']['pairs_per_s']:,.0f} pairs/s, {ratio:.2f}x)"
    ]


@torch.no_grad()
def pair_scoring(data, floors: Floors, quick: bool, k: int = RERANK_K) -> dict:
    """One text against k gallery images per call, from cached image features/tokens: pairs/s."""
    budget = 1.0 if quick else 6.0
    calls = 1 if quick else 3
    k = 16 if quick else k
    states, lengths = data.query_states(1)
    states_t, lengths_t = torch.from_numpy(states).float(), torch.from_numpy(lengths)
    grid = torch.from_numpy(data.grid(k)).float()
    mid = torch.from_numpy(data.mid(k)).float()
    L = int(lengths[0])
    rows: dict[str, dict] = {}
    slow = M.slow_model()
    scorers = (("slow", slow), ("slow_keys_values", slow), ("deformer_joint", M.deformer_joint()))
    names = {
        "slow": "Slow (cross-attention)",
        "slow_keys_values": "Slow, keys/values per image (the path before)",
        "deformer_joint": "deformer (joint, early interaction)",
    }
    for key, ours in scorers:
        if not ours.available:
            rows[key] = {"name": f"ours: {ours.name}", "available": False, "weights": ours.source}
            continue
        fn = M.slow_keys_values_fn(ours) if key == "slow_keys_values" else M.pair_scorer_fn(ours)
        try:
            call = lambda fn=fn: fn(states_t, lengths_t, grid, mid)  # noqa: E731
            out = call()
            if out.numel() != k:
                raise ValueError(f"expected {k} scores, got shape {tuple(out.shape)}")
            r = rate(call, k, budget, calls)
            flops = count_flops(call) / k
        except Exception as e:  # noqa: BLE001 - a model being written may change its signature
            rows[key] = {
                "name": f"ours: {ours.name}",
                "available": False,
                "weights": f"not available (score_texts_images failed: {type(e).__name__}: {e})",
            }
            continue
        rows[key] = {
            **_row(
                f"ours: {names[key]}",
                f"1 text x {k} images from cached features, {M.n_image_tokens(ours)} image tokens",
                r,
                flops,
                floors,
                "pairs_per_s",
                ours.source,
            ),
            "available": True,
        }
    blip = M.blip_itm(layers=2 if quick else None)
    ids = torch.randint(1000, M.BLIP_TEXT["vocab_size"] - 1, (k, L))
    mask = torch.ones(k, L, dtype=torch.long)
    image_embeds = torch.randn(k, M.BLIP_IMAGE_TOKENS, M.BLIP_VISION["hidden_size"])

    def blip_call():
        with _autocast():
            return M.blip_itm_scores(blip, ids, mask, image_embeds)

    rows["blip_itm"] = {
        **_row(
            "BLIP-base ITM head" + (" (2 layers: --quick)" if quick else ""),
            f"1 text x {k} images from cached ViT-B/16 tokens ({M.BLIP_IMAGE_TOKENS} x 768), BERT-base + cross-attn",
            rate(blip_call, k, budget, calls),
            count_flops(blip_call) / k,
            floors,
            "pairs_per_s",
            "random weights (transformers config)",
        ),
        "available": True,
    }
    ratios = {}
    for key in ("slow", "deformer_joint"):
        if rows[key].get("available"):
            ratios[f"{key}_over_blip"] = rows[key]["pairs_per_s"] / rows["blip_itm"]["pairs_per_s"]
    if rows["slow"].get("available") and rows["slow_keys_values"].get("available"):
        ratios["slow_over_its_path_before"] = (
            rows["slow"]["pairs_per_s"] / rows["slow_keys_values"]["pairs_per_s"]
        )
    return {
        "rows": rows,
        "ratios": ratios,
        "k": k,
        "text_tokens": L,
        "precision": _precision_note(),
    }
