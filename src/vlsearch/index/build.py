"""Building and extending gallery indexes from a dataset split or any folder of images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vlsearch.data import CaptionDataset, ImageReport, load_dataset, load_folder
from vlsearch.data.images import IMAGE_EXTENSIONS
from vlsearch.errors import DataError, IndexError_
from vlsearch.index.gallery import (
    GalleryIndex,
    ImageRecord,
    IndexConfig,
    read_captions,
    read_records,
    write_gallery,
)
from vlsearch.models.registry import fingerprint, load_model
from vlsearch.search.embedder import Embedder


def _index_config(
    model_name: str, model, meta, ckpt: Path, embedder: Embedder, kind: str, source: str
) -> IndexConfig:
    return IndexConfig(
        model=str(model_name),
        model_type=meta["model_type"],
        model_fingerprint=fingerprint(ckpt),
        dim=embedder.dim,
        kind=kind,
        image_backbone=embedder.extractor.image_config.tag,
        text_backbone=embedder.extractor.text_config.tag,
        source=source,
    )


def build_index(
    out: str | Path,
    source: str | Path | None = None,
    split: str = "dev",
    model: str = "fast",
    kind: str = "auto",
    dataset: CaptionDataset | None = None,
    progress: bool = True,
) -> tuple[Path, ImageReport]:
    """Embed a gallery (dataset split, or a plain folder of images) and write an index folder atomically."""
    dataset = dataset or load_dataset(source, split)
    net, meta, ckpt = load_model(model)
    embedder = Embedder(net, progress=progress)
    report = ImageReport()
    emb, keys = embedder.embed_paths(dataset.image_paths, report)
    ok = [i for i, k in enumerate(keys) if k is not None]
    if not ok:
        raise DataError(f"none of the {dataset.n_images} images could be read")
    records = [ImageRecord(dataset.image_ids[i], str(dataset.image_paths[i]), keys[i]) for i in ok]
    new_row = {old: new for new, old in enumerate(ok)}
    caps = [
        (t, new_row[int(i)])
        for t, i in zip(dataset.captions, dataset.caption_image, strict=True)
        if int(i) in new_row
    ]
    cap_emb = embedder.embed_texts([t for t, _ in caps]) if caps else None
    config = _index_config(
        model,
        net,
        meta,
        ckpt,
        embedder,
        kind,
        f"{source or 'default data root'} [{dataset.name}:{dataset.split}]",
    )
    write_gallery(out, config, records, emb, caps or None, cap_emb)
    if report:
        print(report.summary(), file=sys.stderr)
    return Path(out), report


def add_to_index(index_dir: str | Path, items, progress: bool = True) -> tuple[int, ImageReport]:
    """Add images (a folder or a list of files) to an index without re-embedding what it holds.

    Rebuilds the vector index from the stored embeddings and swaps it in atomically; O(N) per call.
    """
    index = GalleryIndex.open(index_dir)
    if getattr(index, "is_sharded", False):  # a sharded index grows by a new shard
        return index.add_images(items, progress=progress)
    net, meta, ckpt = load_model(index.config.model)
    if fingerprint(ckpt) != index.config.model_fingerprint:
        raise IndexError_(
            f"index {index_dir} was built with another version of model {index.config.model!r}; rebuild it"
        )
    paths = _expand(items)
    existing = read_records(index)
    have = {r.path for r in existing}
    paths = [p for p in paths if str(Path(p).resolve()) not in have]
    report = ImageReport()
    if not paths:
        return 0, report
    embedder = Embedder(net, progress=progress)
    emb, keys = embedder.embed_paths(paths, report)
    root = Path(items) if isinstance(items, str | Path) and Path(items).is_dir() else None
    new = [
        ImageRecord(str(Path(p).relative_to(root)) if root else Path(p).name, str(Path(p).resolve()), k)
        for p, k in zip(paths, keys, strict=True)
        if k is not None
    ]
    if new:
        all_emb = np.concatenate([np.asarray(index.embeddings, dtype=np.float32), emb])
        caps = read_captions(index)
        cap_emb = (
            index.captions.index.reconstruct_n(0, len(caps)) if caps and index.captions is not None else None
        )
        config = index.config
        index.close()
        write_gallery(index_dir, config, existing + new, all_emb, caps or None, cap_emb)
    return len(new), report


def _expand(items) -> list[Path]:
    if isinstance(items, str | Path):
        p = Path(items)
        if p.is_dir():
            return load_folder(p).image_paths
        if p.is_file():
            return [p.resolve()]
        raise DataError(f"no such file or folder: {p}")
    out = []
    for it in items:
        p = Path(it)
        if not p.is_file():
            raise DataError(f"no such file: {p}")
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"not an image file: {p}")
        out.append(p.resolve())
    return out
