"""Building and extending gallery indexes from a dataset split or any folder of images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vlsearch.data import CaptionDataset, ImageReport, load_dataset, load_folder
from vlsearch.data.datasets import gallery_root, widen_roots
from vlsearch.data.images import IMAGE_EXTENSIONS
from vlsearch.data.metadata import PhotoMeta, read_metadata
from vlsearch.errors import DataError, IndexError_
from vlsearch.index.gallery import GalleryIndex
from vlsearch.index.plain import (
    DEFAULT_SOURCE,
    ImageRecord,
    IndexConfig,
    read_captions,
    read_photos,
    read_records,
    write_gallery,
    write_lock,
)
from vlsearch.models.embedder import Embedder
from vlsearch.models.fast import set_concepts, set_hubness
from vlsearch.models.registry import fingerprint, load_model


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


def embed_gallery(
    embedder: Embedder, dataset: CaptionDataset, report: ImageReport
) -> tuple[list[ImageRecord], np.ndarray, list[tuple[str, int]], np.ndarray | None]:
    """Embed a dataset's readable images and the captions of those images: (records, image embeddings,
    (caption, image row) pairs, caption embeddings or None). Unreadable images go to ``report``."""
    emb, keys = embedder.embed_paths(dataset.image_paths, report)
    ok = [i for i, k in enumerate(keys) if k is not None]
    records = [ImageRecord(dataset.image_ids[i], str(dataset.image_paths[i]), keys[i]) for i in ok]
    new_row = {old: new for new, old in enumerate(ok)}
    caps = [
        (t, new_row[int(i)])
        for t, i in zip(dataset.captions, dataset.caption_image, strict=True)
        if int(i) in new_row
    ]
    cap_emb = embedder.embed_texts([t for t, _ in caps]) if caps else None
    return records, emb, caps, cap_emb


def build_index(
    out: str | Path,
    source: str | Path | None = None,
    split: str = "dev",
    model: str = "fast",
    kind: str = "auto",
    dataset: CaptionDataset | None = None,
    progress: bool = True,
    exclude: list[str] | tuple[str, ...] = (),
    concepts: bool = True,
    follow_symlinks: bool = False,
    hubness: bool = True,
) -> tuple[Path, ImageReport]:
    """Embed a gallery (dataset split, or a plain folder of images) and write an index folder atomically.
    ``exclude``: glob patterns (on paths relative to a plain folder) of files to leave out.
    ``concepts=False`` leaves the model's concept channel out of the vectors (recorded in the config),
    ``hubness=False`` its hubness prior (models/hubness.py; recorded too).
    ``follow_symlinks``: index links whose target is outside the folder (recorded; the service serves them)."""
    if dataset is None and exclude:
        if source is None or not Path(source).is_dir():
            raise DataError("--exclude applies to a folder of images")
    if dataset is None and source is not None and Path(source).is_dir() and (exclude or follow_symlinks):
        dataset = load_folder(source, exclude=exclude, follow_symlinks=follow_symlinks)
    dataset = dataset or load_dataset(source, split)
    net, meta, ckpt = load_model(model)
    concepts = set_concepts(net, concepts)
    set_hubness(net, hubness)
    embedder = Embedder(net, progress=progress)
    report = ImageReport()
    records, emb, caps, cap_emb = embed_gallery(embedder, dataset, report)
    from vlsearch.index.build_video import embed_videos, find_videos

    # plain folders hold videos too
    videos = find_videos(source if dataset.split == "all" else None, follow_symlinks, exclude)
    moments, v_emb, video_records = embed_videos(embedder, videos, len(records), report)
    if not records and not moments:
        raise DataError(f"none of the {dataset.n_images + len(videos)} images and videos could be read")
    records, emb = records + moments, _stack(emb, v_emb)
    config = _index_config(
        model,
        net,
        meta,
        ckpt,
        embedder,
        kind,
        f"{source or DEFAULT_SOURCE} [{dataset.name}:{dataset.split}]",
    )
    config.concepts = concepts
    config.hubness = hubness
    config.roots = [gallery_root(dataset, source)]
    config.follow_symlinks = follow_symlinks
    write_gallery(
        out, config, records, emb, caps or None, cap_emb, photos=photos_of(records), videos=video_records
    )
    if report:
        print(report.summary(), file=sys.stderr)
    return Path(out), report


def photos_of(records: list[ImageRecord]) -> list[PhotoMeta]:
    """Capture time, camera, GPS, folder and size of each record's file (EXIF headers only)."""
    return [read_metadata(r.path, r.id) for r in records]


def _stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    parts = [np.asarray(x, np.float32) for x in (a, b) if len(x)]
    return np.concatenate(parts) if parts else np.zeros((0, b.shape[1] if b.ndim == 2 else 0), np.float32)


def add_to_index(
    index_dir: str | Path, items, progress: bool = True, exclude: list[str] | tuple[str, ...] = ()
) -> tuple[int, ImageReport]:
    """Add images and videos (a folder or a list of files) to an index without re-embedding what it
    holds; returns the number of rows added (a video adds one per moment).

    New files are embedded first, then written as one new segment (O(new), index/update.py): the
    photos, then each video's moments. Paths another writer added meanwhile are skipped. A plain index
    becomes segmented on its first add, except one written before photo metadata: that one is
    rewritten whole (O(N)), as before.
    """
    index = GalleryIndex.open(index_dir)
    segmented = hasattr(index, "shards")
    if segmented:
        have = {r.path for r in index.all_records()}
    else:
        have = {r.path for r in read_records(index)}
    net = checked_model(index)
    legacy = not segmented and _needs_rewrite(index)
    index.close()
    from vlsearch.index.build_video import find_videos

    new_videos = {p: i for p, i in find_videos(items, exclude=exclude).items() if p not in have}
    if legacy:
        return _rewrite_with(index_dir, net, items, have, new_videos, progress, exclude)
    new, emb, report = embed_new_images(net, _photos_only(items), have, progress, exclude)
    new, emb, video_records = _with_videos(net, new_videos, new, emb, report, progress)
    if not new:
        return 0, report
    from vlsearch.index.update import add_records

    # the segment is written through this module's name, so tests can hold a writer inside it
    return add_records(
        index_dir,
        new,
        emb,
        photos_of(new),
        write=lambda *a, **k: write_gallery(*a, **k),
        videos=video_records,
    ), report


def _needs_rewrite(index) -> bool:
    """A plain index that cannot simply become a segment: one written before photo metadata."""
    from vlsearch.index.photos import has_photos

    return not has_photos(index._db)


def _with_videos(net, new_videos: dict[str, str], new, emb, report, progress):
    """(records, embeddings, video records): the new photos' with the moments of ``new_videos``
    appended (rows numbered from 0 among the new ones), and those videos' records."""
    if not new_videos:
        return new, emb, []
    from vlsearch.index.build_video import embed_videos

    moments, v_emb, videos = embed_videos(Embedder(net, progress=progress), new_videos, 0, report)
    return new + moments, _stack(emb, v_emb), videos


def _rewrite_with(index_dir, net, items, have, new_videos, progress, exclude) -> tuple[int, ImageReport]:
    """The whole-index rewrite of a plain index written before photo metadata."""
    from vlsearch.index.videos import read_videos, video_layout

    new, emb, report = embed_new_images(net, _photos_only(items), have, progress, exclude)
    new, emb, new_video_records = _with_videos(net, new_videos, new, emb, report, progress)
    if not new:
        return 0, report
    with write_lock(index_dir):
        index = GalleryIndex.open(index_dir)
        if hasattr(index, "shards"):  # another writer made it segmented meanwhile
            index.close()
            from vlsearch.index.update import add_records

            return add_records(index_dir, new, emb, photos_of(new), videos=new_video_records), report
        existing = read_records(index)
        new, emb = not_yet_in(new, emb, {r.path for r in existing})
        if new:
            all_emb = np.concatenate([np.asarray(index.embeddings, dtype=np.float32), emb])
            caps = read_captions(index)
            cap_emb = index.captions.reconstruct_all() if caps and index.captions is not None else None
            config = index.config
            if config.roots:  # the new files' folders are served too
                config.roots = widen_roots(config.roots, [r.path for r in new])
            old = read_photos(index)  # an index from before the photos table: read its files now
            old = [m or read_metadata(r.path, r.id) for m, r in zip(old, existing, strict=True)]
            videos = read_videos(index) + video_layout(new, len(existing), new_video_records)
            index.close()
            write_gallery(
                index_dir,
                config,
                existing + new,
                all_emb,
                caps or None,
                cap_emb,
                photos=old + photos_of(new),
                videos=videos,
            )
        else:
            index.close()
    return len(new), report


def _photos_only(items):
    """What of ``items`` is for the photo path: a folder stays (its videos are found separately)."""
    from vlsearch.data.video import VIDEO_EXTENSIONS

    if isinstance(items, str | Path):
        p = Path(items)
        return [] if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS else items
    return [it for it in items if Path(it).suffix.lower() not in VIDEO_EXTENSIONS]


def checked_model(index):
    """The model an index was built with, refusing other weights under the same name."""
    net, _, ckpt = load_model(index.config.model)
    if fingerprint(ckpt) != index.config.model_fingerprint:
        raise IndexError_(
            f"index {index.path} was built with another version of model {index.config.model!r}; rebuild it"
        )
    set_concepts(net, getattr(index.config, "concepts", True))
    set_hubness(net, getattr(index.config, "hubness", True))
    return net


def embed_new_images(
    net, items, have: set[str], progress: bool, exclude: list[str] | tuple[str, ...] = ()
) -> tuple[list[ImageRecord], np.ndarray, ImageReport]:
    """Embed the images of ``items`` whose resolved path is not in ``have``: their records, embeddings
    [n, dim] and the report of unreadable files (left out)."""
    todo = {path: name for path, name in images_to_add(items, exclude).items() if path not in have}
    report = ImageReport()
    if not todo:
        return [], np.zeros((0, 0), dtype=np.float32), report
    paths = list(todo)
    emb, keys = Embedder(net, progress=progress).embed_paths(paths, report)
    new = [ImageRecord(todo[p], p, k) for p, k in zip(paths, keys, strict=True) if k is not None]
    return new, np.asarray(emb, dtype=np.float32), report


def not_yet_in(
    new: list[ImageRecord], emb: np.ndarray, have: set[str]
) -> tuple[list[ImageRecord], np.ndarray]:
    """The embedded images (records, rows of ``emb``) whose path another writer has not added since."""
    keep = [n for n, r in enumerate(new) if r.path not in have]
    return [new[n] for n in keep], emb[keep]


def images_to_add(items, exclude: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """A folder (recursively) or a list of files -> {resolved path: id}; ids are paths relative to the
    folder added (symlinks keep their own name), or file names."""
    if isinstance(items, str | Path):
        p = Path(items)
        if p.is_dir():
            folder = load_folder(p, exclude=exclude)
            return {str(path): name for path, name in zip(folder.image_paths, folder.image_ids, strict=True)}
        if p.is_file():
            return {str(p.resolve()): p.name}
        raise DataError(f"no such file or folder: {p}")
    out = {}
    for it in items:
        p = Path(it)
        if not p.is_file():
            raise DataError(f"no such file: {p}")
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"not an image file: {p}")
        out[str(p.resolve())] = p.name
    return out
