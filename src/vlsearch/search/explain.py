"""Where each word looked: the Slow model's word-to-region cross-attention as JSON and PNG overlays.

An explanation (one per re-ranked result) is ``{"tokens": [words], "grid": [14, 14], "maps": [[196 floats]
per word]}``: content words only ([CLS]/[SEP], punctuation and stop words dropped, word-pieces merged), each
map row-major over the image's 14x14 grid and summing to 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_bytes, atomic_write_json
from vlsearch.data.photo import upright_rgb
from vlsearch.data.safe_decode import open_image

SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}
STOP_WORDS = set(
    "a an the and or of in on at to with by for from is are was were be been being it its this that these "
    "those there their his her he she they them as into onto up down out over under while who which what "
    "has have had do does did not no some any each other than then very can will just through across along "
    "toward towards off".split()
)
_PUNCT = re.compile(r"^[\W_]+$")


def word_maps(tokens: list[str], maps: np.ndarray, side: int = 14) -> dict:
    """Word-pieces (tokens [L], with maps [L, side*side]) -> one map per content word.

    A word's map is the mean of its pieces' maps, renormalised to sum to 1."""
    words: list[tuple[str, list[int]]] = []
    for i, tok in enumerate(tokens):
        if tok in SPECIAL:
            words.append(("", []))  # a boundary: the next piece cannot continue a word across it
            continue
        if tok.startswith("##") and words and words[-1][0]:
            words[-1] = (words[-1][0] + tok[2:], words[-1][1] + [i])
        else:
            words.append((tok, [i]))
    out_words, out_maps = [], []
    for word, idx in words:
        if not word or _PUNCT.match(word) or word.lower() in STOP_WORDS:
            continue
        m = np.asarray(maps, dtype=np.float64)[idx].mean(0)
        m = m / max(m.sum(), 1e-12)
        out_words.append(word)
        out_maps.append([round(float(x), 6) for x in m])
    return {"tokens": out_words, "grid": [side, side], "maps": out_maps}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))[:80] or "result"


def overlay_png(image_path: str | Path, explanation: dict, size: int = 224) -> bytes:
    """One panel per word: the image with that word's heat map over it (red = attended), word as title."""
    import io

    from PIL import Image, ImageDraw

    img = upright_rgb(open_image(image_path)).resize((size, size))
    base = np.asarray(img, dtype=np.float32) / 255.0
    gh, gw = explanation["grid"]
    words = explanation["tokens"] or ["(no content words)"]
    maps = explanation["maps"] or [[0.0] * (gh * gw)]
    title = 18
    sheet = Image.new("RGB", (size * (len(words) + 1), size + title), "white")
    sheet.paste(img, (0, title))
    ImageDraw.Draw(sheet).text((4, 3), "image", fill="black")
    for n, (word, m) in enumerate(zip(words, maps, strict=True), start=1):
        heat = np.asarray(m, dtype=np.float32).reshape(gh, gw)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)  # contrast per word
        up = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        a = (up.astype(np.float32) / 255.0)[..., None]
        red = np.array([1.0, 0.1, 0.0], dtype=np.float32)
        mixed = base * (1 - 0.6 * a) * 0.8 + 0.6 * a * red + 0.2 * base * (1 - a)
        panel = Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8))
        sheet.paste(panel, (n * size, title))
        ImageDraw.Draw(sheet).text((n * size + 4, 3), word, fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_explanations(out_dir: str | Path, hits, explanations) -> list[Path]:
    """Per result: ``NN-<id>.json`` (the explanation plus the hit's id/path/row/rank) and ``NN-<id>.png``
    (heat maps over the image; skipped when the image cannot be read). Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for rank, (hit, exp) in enumerate(zip(hits, explanations, strict=True), start=1):
        stem = f"{rank:02d}-{_safe(Path(str(hit.id)).stem)}"
        meta = {"rank": rank, "id": hit.id, "path": str(hit.path), "row": int(hit.row), **exp}
        js = out_dir / f"{stem}.json"
        atomic_write_json(js, meta)
        written.append(js)
        try:
            png = overlay_png(hit.path, exp)
        except (OSError, ValueError):
            continue
        atomic_write_bytes(out_dir / f"{stem}.png", png)
        written.append(out_dir / f"{stem}.png")
    return written
