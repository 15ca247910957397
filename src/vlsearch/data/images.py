"""Reading images safely: a corrupt or unreadable file is reported, never a crash."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlsearch.data.photo import HEIF_EXTENSIONS, decode_square
from vlsearch.data.safe_decode import DecodeTimeout, open_image
from vlsearch.errors import QueryError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", *HEIF_EXTENSIONS}


@dataclass
class ImageReport:
    """Files that could not be used, with the reason, for the user to see."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def __bool__(self) -> bool:
        return bool(self.skipped)

    def summary(self, limit: int = 10) -> str:
        lines = [f"skipped {len(self.skipped)} unreadable image(s):"]
        lines += [f"  {p}: {r}" for p, r in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def load_image(source, size: int = 224, draft: bool = True) -> np.ndarray:
    """Decode a path, bytes or PIL image to a ``size`` x ``size`` RGB uint8 array.

    Images are resized to a square without keeping the aspect ratio, as the Flickr8k copies we train on
    were, so query-time inputs look like training inputs. Photos are turned upright (EXIF orientation),
    composited on white where transparent, and JPEGs decoded at reduced scale unless ``draft=False``
    (``data.photo``). Raises ValueError with a readable reason.
    """
    try:
        img = open_image(source)  # allowed formats only, pixel/scan caps, a decode deadline
        img = decode_square(img, size, draft)  # upright, alpha on white, JPEG draft (data.photo)
    except QueryError as e:
        raise ValueError(str(e)) from e
    except DecodeTimeout as e:
        raise ValueError(f"not a readable image ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e
    return np.asarray(img, dtype=np.uint8)
