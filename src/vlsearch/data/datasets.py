"""Caption datasets in the standard formats, reduced to one shape: images, captions, caption -> image."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.data.images import IMAGE_EXTENSIONS
from vlsearch.data.video import VIDEO_EXTENSIONS
from vlsearch.errors import DataError, MissingSplitError
from vlsearch.settings import data_root

SPLIT_ALIASES = {
    "dev": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
    "train": "train",
    "test": "test",
}


@dataclass
class CaptionDataset:
    """Images (absolute paths, stable ids) and captions, with ``caption_image[c]`` the image of caption c."""

    name: str
    split: str
    image_paths: list[Path]
    image_ids: list[str]
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.captions) != len(self.caption_image):
            raise DataError("captions and caption_image differ in length")

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    def image_captions(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_images)]
        for c, i in enumerate(self.caption_image):
            out[i].append(c)
        return out

    def subset(self, image_indices) -> CaptionDataset:
        """The given images with all their captions, in the given order."""
        image_indices = [int(i) for i in image_indices]
        remap = {old: new for new, old in enumerate(image_indices)}
        caps, cap_img = [], []
        for c, i in enumerate(self.caption_image):
            if int(i) in remap:
                caps.append(self.captions[c])
                cap_img.append(remap[int(i)])
        return CaptionDataset(
            self.name,
            self.split,
            [self.image_paths[i] for i in image_indices],
            [self.image_ids[i] for i in image_indices],
            caps,
            np.asarray(cap_img, dtype=np.int64),
        )

    def sample(self, n_images: int, seed: int = 0) -> CaptionDataset:
        """A seeded random subset of ``n_images`` images with all their captions (for costly models)."""
        if n_images >= self.n_images:
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(self.n_images, size=n_images, replace=False)))

    def without_images(self, drop: set[int]) -> CaptionDataset:
        return self.subset([i for i in range(self.n_images) if i not in drop]) if drop else self


def _build(
    name: str, split: str, image_dir: Path, pairs: list[tuple[str, str]], order: list[str]
) -> CaptionDataset:
    """pairs: (image file name, caption); order: image file names in split order. Missing files are dropped."""
    caps_by_image: dict[str, list[str]] = defaultdict(list)
    for img, cap in pairs:
        caps_by_image[img].append(cap.strip())
    paths, ids, captions, cap_img = [], [], [], []
    for img in order:
        check_inside(name, img, image_dir)
        path = image_dir / img
        if not path.is_file():
            continue
        idx = len(paths)
        paths.append(path.resolve())
        ids.append(img)
        for cap in caps_by_image.get(img, []):
            captions.append(cap)
            cap_img.append(idx)
    if not paths:
        raise DataError(f"{name} split {split!r}: none of its images were found under {image_dir}")
    return CaptionDataset(name, split, paths, ids, captions, np.asarray(cap_img, dtype=np.int64))


def check_inside(name: str, rel: str, root: Path) -> None:
    """An annotation's file name must stay inside the dataset folder: an absolute path or ``..`` would
    index (and the service would serve) any file on the machine."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or "\x00" in rel:
        raise DataError(
            f"{name}: image file name {rel[:200]!r} leaves the dataset folder {root}; "
            "annotations must use paths relative to it"
        )


def _norm_split(split: str) -> str:
    s = SPLIT_ALIASES.get(split.lower())
    if s is None and split.lower() not in {"all"}:
        raise DataError(f"unknown split {split!r}: use train, dev (val) or test")
    return s or "all"


def find_flickr8k(root: Path) -> Path | None:
    for cand in (root, root / "flickr8k", root / "Flickr8k"):
        if (cand / "Flickr8k_text").is_dir() or (cand / "Flickr8k.token.txt").is_file():
            return cand
    return None


def load_flickr8k(root: str | Path, split: str = "dev") -> CaptionDataset:
    """The official Flickr8k layout; any of the split files may be absent (then that split is unavailable)."""
    root = Path(root)
    base = find_flickr8k(root)
    if base is None:
        raise DataError(f"no Flickr8k layout (Flickr8k_text/Flickr8k.token.txt) under {root}")
    text_dir = base / "Flickr8k_text" if (base / "Flickr8k_text").is_dir() else base
    image_dir = next(
        (base / d for d in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images") if (base / d).is_dir()), None
    )
    if image_dir is None:
        raise DataError(f"no image folder (Flicker8k_Dataset/) under {base}")
    token_file = text_dir / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise DataError(f"missing caption file {token_file}")
    pairs = []
    for line in token_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if "\t" not in line:
            continue
        key, cap = line.split("\t", 1)
        pairs.append((key.split("#", 1)[0], cap))
    split = _norm_split(split)
    if split == "all":
        order = sorted({p[0] for p in pairs})
    else:
        fname = {
            "train": "Flickr_8k.trainImages.txt",
            "dev": "Flickr_8k.devImages.txt",
            "test": "Flickr_8k.testImages.txt",
        }[split]
        split_file = text_dir / fname
        if not split_file.is_file():
            have = sorted(p.name for p in text_dir.glob("Flickr_8k.*Images.txt"))
            raise MissingSplitError(
                f"Flickr8k split {split!r} not available: {split_file} is missing (found: {have or 'none'})"
            )
        order = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    return _build("flickr8k", split, image_dir, pairs, order)


def load_coco(root: str | Path, split: str = "train2017") -> CaptionDataset:
    """Official COCO captions: ``annotations/captions_<split>.json`` and the ``<split>/`` image folder."""
    root = Path(root)
    ann_dir = root / "annotations"
    candidates = sorted(ann_dir.glob("captions_*.json")) if ann_dir.is_dir() else []
    if not candidates:
        raise DataError(f"no COCO caption file annotations/captions_*.json under {root}")
    by_split = {p.stem.removeprefix("captions_"): p for p in candidates}
    if split not in by_split:
        if len(by_split) == 1 and split in SPLIT_ALIASES:
            split = next(iter(by_split))
        else:
            raise MissingSplitError(f"COCO split {split!r} not found; available: {sorted(by_split)}")
    data = json.loads(by_split[split].read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    names = {im["id"]: im["file_name"] for im in images}
    pairs = [
        (names[a["image_id"]], a["caption"])
        for a in sorted(data["annotations"], key=lambda a: a["id"])
        if a["image_id"] in names
    ]
    image_dir = root / split if (root / split).is_dir() else root / "images"
    return _build("coco", split, image_dir, pairs, [im["file_name"] for im in images])


def load_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, split: str = "dev"
) -> CaptionDataset:
    """Karpathy's ``dataset_{flickr8k,flickr30k,coco}.json``: images with sentences and a split field."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    image_root = Path(image_root) if image_root else json_path.parent
    split = _norm_split(split)
    wanted = {"train": {"train", "restval"}, "dev": {"val"}, "test": {"test"}, "all": None}[split]
    pairs, order = [], []
    for im in data["images"]:
        if wanted is not None and im.get("split") not in wanted:
            continue
        rel = str(Path(im.get("filepath", "")) / im["filename"]) if im.get("filepath") else im["filename"]
        order.append(rel)
        pairs += [(rel, s.get("raw") or " ".join(s.get("tokens", []))) for s in im.get("sentences", [])]
    if not order:
        raise MissingSplitError(f"{json_path} has no images in split {split!r}: use train, dev (val) or test")
    for sub in ("", "images", "Flicker8k_Dataset", "flickr30k-images"):
        cand = image_root / sub if sub else image_root
        if order and (cand / order[0]).is_file():
            image_root = cand
            break
    name = data.get("dataset", json_path.stem.removeprefix("dataset_"))
    return _build(name, split, image_root, pairs, order)


OS_METADATA = {".DS_Store", "Thumbs.db", "desktop.ini", "@eaDir", "__MACOSX", ".AppleDouble", "$RECYCLE.BIN"}


def skipped_name(part: str) -> bool:
    """Hidden files and folders and what operating systems and NAS boxes leave beside photos
    (``._*`` AppleDouble forks, ``@eaDir`` Synology thumbnails, ``Thumbs.db``...)."""
    return part.startswith(".") or part in OS_METADATA


def load_folder(
    folder: str | Path, exclude: list[str] | tuple[str, ...] = (), follow_symlinks: bool = False
) -> CaptionDataset:
    """Every image file below a folder (recursively), no captions; hidden and OS files skipped, and
    files whose relative path (or name) matches an ``exclude`` glob. A symlink whose target lies outside
    the folder is left out unless ``follow_symlinks``: a link planted in a photo folder must not put
    (and the service must not serve) a file from elsewhere on the machine."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    candidates = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(skipped_name(part) for part in p.relative_to(folder).parts)
        and not excluded(p.relative_to(folder), exclude)
        and p.is_file()
    )
    files = [p for p in candidates if follow_symlinks or inside(p, folder)]
    if len(files) < len(candidates):
        n = len(candidates) - len(files)
        print(
            f"warning: left out {n} symlink(s) under {folder} whose target lies outside it "
            "(index them with --follow-symlinks)",
            file=sys.stderr,
        )
    if not files:
        if not any(p.suffix.lower() in VIDEO_EXTENSIONS for p in folder.rglob("*")):
            exts = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
            raise DataError(f"no images or videos ({exts}) under {folder}")
    return CaptionDataset(
        folder.name, "all", [p.resolve() for p in files], [str(p.relative_to(folder)) for p in files]
    )


def inside(path: Path, root: Path) -> bool:
    """The file's real location (links resolved) lies within ``root``'s real location."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def excluded(rel: Path, patterns) -> bool:
    """``rel`` matches a glob: on the whole relative path, on its name, or on a folder in it."""
    text = rel.as_posix()
    return any(
        fnmatch.fnmatch(text, pat)
        or fnmatch.fnmatch(rel.name, pat)
        or any(fnmatch.fnmatch(p, pat.rstrip("/")) for p in rel.parts[:-1])
        for pat in patterns
    )


def load_dataset(root: str | Path | None = None, split: str = "dev") -> CaptionDataset:
    """Detect the format under ``root`` (default data root): Flickr8k, COCO, Karpathy JSON, or a plain folder."""

    root = Path(root) if root is not None else data_root()
    if not root.exists():
        raise DataError(f"data root {root} does not exist (set --data-root or $VLSEARCH_DATA)")
    if root.is_file() and root.suffix == ".json":
        return load_karpathy(root, split=split)
    if find_flickr8k(root) is not None:
        return load_flickr8k(root, split)
    if (root / "annotations").is_dir():
        return load_coco(root, split if split not in SPLIT_ALIASES else "train2017")
    karpathy = sorted(root.glob("dataset_*.json"))
    if karpathy:
        return load_karpathy(karpathy[0], root, split)
    return load_folder(root)


def gallery_root(dataset: CaptionDataset, source: str | Path | None = None) -> str:
    """The folder a gallery's files lie in: the folder indexed, or the dataset's image folder (the
    common parent of its files). The service serves files from its index's roots only."""
    if source is not None and Path(source).is_dir() and dataset.split == "all":
        return str(Path(source).resolve())
    parents = {str(Path(p).parent) for p in dataset.image_paths}
    return os.path.commonpath(sorted(parents)) if parents else ""


def widen_roots(roots: list[str], paths) -> list[str]:
    """An index's roots after adding files at ``paths``: the folder of each one outside them joins."""
    outside = {str(Path(p).parent) for p in paths if not any(Path(p).is_relative_to(Path(r)) for r in roots)}
    return sorted(set(roots) | outside)
