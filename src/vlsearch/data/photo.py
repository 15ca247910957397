"""Photos as cameras and phones write them: EXIF orientation, JPEG draft decoding, HEIC, alpha.

``open_photo`` gives the upright RGB picture a person sees, decoded no larger than needed: JPEGs are
decoded in the DCT domain at 1/2, 1/4 or 1/8 scale (``Image.draft``) while staying at least
``DRAFT_FACTOR`` times the model's input size, which is what makes 12-megapixel photos cheap.
``decode_variant`` says whether that picture can differ from the plain decode older versions used, so
the content-addressed feature cache keys such files apart (and keeps every other cached entry valid).
"""

from __future__ import annotations

from PIL import Image, ImageOps

from vlsearch.data.safe_decode import open_image

try:  # HEIC/HEIF, as iPhones write them
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_EXTENSIONS = {".heic", ".heif"}
except ImportError:  # pragma: no cover - pillow-heif is a dependency; without it HEIC is just unreadable
    HEIF_EXTENSIONS = set()

DRAFT_FACTOR = 2  # decode JPEGs to no less than twice the model's input size
ORIENTATION_TAG = 0x0112
PHOTO_VARIANT = "photo-v1"  # bump when the decode below changes the pixels of rotated or alpha files
# Large JPEGs (draft decoded) have a variant of their own: v2 resizes with a reducing gap of 1.5, not
# 2.0 (v1). On a 12 MP photo that takes the resize from 3.05 to 1.70 ms of a ~15 ms decode, and its
# embeddings stay as close to a full decode (cosine min 0.997 over 48 photos, bench `photos_decode`);
# a gap of 1.0 fell to 0.984.
DRAFT_VARIANT = "photo-v2"
REDUCING_GAP = 1.5


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation, not an unreadable image
        return 1


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def draft_applies(img: Image.Image, size: int) -> bool:
    """JPEG draft only shrinks by 2, 4 or 8, so it changes pixels from ``2 * DRAFT_FACTOR * size`` up."""
    return img.format == "JPEG" and min(img.size) >= 2 * DRAFT_FACTOR * size


def decode_variant(img: Image.Image, size: int) -> str:
    """'' when ``open_photo`` decodes ``img`` (opened, not loaded) as the plain decode always did."""
    if draft_applies(img, size):
        return DRAFT_VARIANT
    if orientation(img) not in (1, 0) or has_alpha(img):
        return PHOTO_VARIANT
    return ""


def decode_square(img: Image.Image, size: int, draft: bool = True) -> Image.Image:
    """An opened image -> upright RGB ``size`` x ``size`` (bicubic). Large JPEGs decode at reduced scale
    (draft) and, already salted apart in the cache, resize with PIL's two-step ``reducing_gap``."""
    drafted = draft and draft_applies(img, size)
    img = upright_rgb(img, size if drafted else None)
    return img.resize((size, size), Image.BICUBIC, reducing_gap=REDUCING_GAP if drafted else None)


def upright_rgb(img: Image.Image, size: int | None = None) -> Image.Image:
    """Decode an opened image to upright RGB; with ``size``, JPEGs decode at reduced scale (draft)."""
    if size and draft_applies(img, size):
        target = DRAFT_FACTOR * size
        img.draft("RGB", (target, target))
    img.load()
    if orientation(img) not in (1, 0):
        img = ImageOps.exif_transpose(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


BROWSER_UNSHOWN = {".tif", ".tiff", *HEIF_EXTENSIONS}  # formats a browser's <img> does not display


def display_jpeg(path, max_side: int = 1600) -> bytes:
    """An upright JPEG of at most ``max_side`` pixels, for showing a HEIC or TIFF file in a browser."""
    import io

    with open_image(path) as img:
        img = upright_rgb(img, max_side // (2 * DRAFT_FACTOR))
        img.thumbnail((max_side, max_side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()
