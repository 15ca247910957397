"""`vlsearch eval --suite`: Flickr8k dev and coco-mini side by side (and any folders the user names), each
with the concept channel on and off in the same run, so the baseline is measured beside the result.

Evaluating beyond Flickr8k is the habit: the trained parts have only seen Flickr8k, so a gain that holds
there but not on COCO photos is not a gain for a user's own collection.
"""

from __future__ import annotations

from pathlib import Path

from vlsearch.data import load_dataset
from vlsearch.errors import DataError
from vlsearch.eval.evaluate import evaluate
from vlsearch.settings import data_root


def default_galleries(root: str | Path | None = None) -> list[tuple[str, Path, str]]:
    """(name, root, split): Flickr8k dev under the data root, and coco-mini beside it when present."""
    root = Path(root) if root is not None else data_root()
    out = [("flickr8k-dev", root, "dev")]
    for candidate in (root / "coco-mini", root.parent / "coco-mini"):
        if (candidate / "annotations").is_dir():
            out.append(("coco-mini", candidate, "dev"))
            break
    return out


def parse_gallery(spec: str) -> tuple[str, Path, str]:
    """``PATH`` or ``PATH:SPLIT`` (a COCO, Karpathy or Flickr-layout folder with captions)."""
    path, _, split = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"gallery {spec!r}: {p} does not exist")
    return p.name, p, split or "dev"


def run_suite(
    model: str = "fast",
    root: str | Path | None = None,
    extra: list[str] = (),
    images: int | None = None,
    progress: bool = False,
    hubness: bool = True,
) -> dict:
    """{"model", "galleries": [{"name", "with_concepts", "without_concepts"}]} (without: Fast alone).
    ``hubness=False``: every run with the model's hubness prior off (models/hubness.py)."""
    galleries = default_galleries(root) + [parse_gallery(s) for s in extra]
    rows = []
    for name, path, split in galleries:
        dataset = load_dataset(path, split)
        if images:
            dataset = dataset.sample(images, 0)
        row = {"name": name, "root": str(path)}
        for key, on in (("with_concepts", True), ("without_concepts", False)):
            r = evaluate(model=model, dataset=dataset, concepts=on, progress=progress, hubness=hubness)
            row[key] = r
            if not r["concepts"]:  # no channel in this model: one measurement is both
                row["without_concepts"] = r
                break
        rows.append(row)
    return {"model": str(model), "galleries": rows}


def suite_table(result: dict) -> str:
    """A Markdown table, one row per gallery and channel setting."""
    lines = [
        "| gallery | images | captions | concepts | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | RSUM | "
        "bytes/image | encode ms/query |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["galleries"]:
        seen = set()
        for key in ("without_concepts", "with_concepts"):
            r = g[key]
            if id(r) in seen:
                continue
            seen.add(id(r))
            t, i, c = r["t2i"], r["i2t"], r["cost"]
            label = f"on (w={r['concept_weight']:g})" if r["concepts"] else "off"
            lines.append(
                f"| {g['name']} | {r['n_images']} | {r['n_captions']} | {label} | {t['r1']:.1f} | {t['r5']:.1f} | "
                f"{t['r10']:.1f} | {i['r1']:.1f} | {i['r5']:.1f} | {i['r10']:.1f} | {r['rsum']:.1f} | "
                f"{c.get('bytes_per_image', '')} | {c.get('fast_encode_ms', 0):.2f} |"
            )
    return "\n".join(lines)
