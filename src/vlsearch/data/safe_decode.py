"""Decoding untrusted image bytes with bounds: only photo formats, a pixel cap, a scan cap, a deadline.

Anyone who can reach the service can send it anything, and `vlsearch index` reads whatever lies in a
folder. Pillow would hand an EPS to Ghostscript (a subprocess) and parse FITS, PSD, ICNS ... on the way
to "cannot identify"; a progressive JPEG with thousands of scans makes libjpeg redo the whole
coefficient buffer per scan. So:

* ``Image.open(..., formats=ALLOWED)``: the decoders a photo library needs and nothing else; anything
  else raises :class:`UnsupportedFormat` (the service answers 415 naming the allowed ones).
* at most :data:`MAX_PIXELS` pixels (Pillow's own default; its DecompressionBombWarning is an error).
* a JPEG with more than :data:`MAX_JPEG_SCANS` SOS markers is refused before decoding.
* decoding reads its input through :class:`_DeadlineReader`, which raises :class:`DecodeTimeout` once
  the wall-clock budget is spent: Pillow feeds its decoders in small blocks from Python, so the check
  runs between blocks and the overshoot is bounded by one block's work (``BLOCK`` bytes).
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from vlsearch.errors import QueryError

# What a photo library holds; HEIF is decoded when pillow-heif has registered its opener.
ALLOWED = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (1 GiB of RGBA / 4 / 3)
MAX_JPEG_SCANS = 64  # libjpeg-turbo's own progressive files have ~10; thousands is an attack
DECODE_TIMEOUT_S = 5.0  # a 12 Mpx JPEG decodes in ~0.2 s on one core
BLOCK = 16 * 1024  # bytes handed to a decoder between deadline checks

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class UnsupportedFormat(QueryError):
    """Bytes that are no image in an allowed format (the service answers 415)."""


class DecodeTimeout(OSError):
    """A decode ran past its wall-clock budget."""


def allowed_formats() -> list[str]:
    """ALLOWED, restricted to the openers Pillow has registered (it raises KeyError on an unknown name)."""
    Image.init()
    return [f for f in ALLOWED if f in Image.OPEN]


def allowed_text() -> str:
    return ", ".join("HEIC/HEIF" if f == "HEIF" else f for f in ALLOWED)


class _DeadlineReader(io.BytesIO):
    """The image bytes, refusing further reads once ``deadline`` (time.monotonic) has passed."""

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self.deadline = deadline

    def read(self, n: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise DecodeTimeout("decoding took too long: the image was refused")
        return super().read(n)


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG. Entropy-coded data stuffs every 0xFF with 0x00, so FF DA only
    appears as a marker (an EXIF thumbnail adds one)."""
    return data.count(b"\xff\xda")


def open_image(
    source, timeout: float = DECODE_TIMEOUT_S, what: str = "image", max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Open ``source`` (a path, bytes or PIL image) in an allowed format, checked against the pixel and
    scan caps; the caller's ``load()`` (and ``draft()``) then runs under the ``timeout`` deadline, which
    starts now. Raises UnsupportedFormat for other formats, QueryError for refused or broken images."""
    if isinstance(source, Image.Image):
        return source
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    if not data:
        raise QueryError(f"the {what} is empty")
    if data[:2] == b"\xff\xd8" and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise QueryError(
            f"the {what} is a JPEG with {jpeg_scans(data)} scans; at most {MAX_JPEG_SCANS} are decoded"
        )
    fp = _DeadlineReader(data, time.monotonic() + timeout)
    try:
        image = Image.open(fp, formats=allowed_formats())
    except UnidentifiedImageError as e:
        raise UnsupportedFormat(f"the {what} is in no allowed image format ({allowed_text()})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise QueryError(f"the {what} has too many pixels; the limit is {MAX_PIXELS // 1_000_000} Mpx") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise QueryError(f"the {what} is not a readable image ({type(e).__name__}: {e})") from e
    w, h = image.size
    if w * h > min(max_pixels, MAX_PIXELS):
        limit = min(max_pixels, MAX_PIXELS) // 1_000_000
        raise QueryError(f"the {what} is {w}x{h} pixels; the limit is {limit} Mpx")
    if isinstance(image, ImageFile.ImageFile):
        image.decodermaxblock = BLOCK
    return image


def decode(
    source, timeout: float = DECODE_TIMEOUT_S, what: str = "image", max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """:func:`open_image` and load the pixels; every failure is a QueryError (or UnsupportedFormat)."""
    image = open_image(source, timeout, what, max_pixels)
    try:
        image.load()
    except DecodeTimeout as e:
        raise QueryError(f"the {what} took longer than {timeout:g} s to decode: refused") from e
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombWarning) as e:
        raise QueryError(f"the {what} is not a readable image ({type(e).__name__}: {e})") from e
    return image


def open_header(path) -> Image.Image:
    """``Image.open`` of a file for its header (size, EXIF) only, in the allowed formats: a file that
    claims another format is refused before any plugin outside the allowlist sees it."""
    try:
        return Image.open(path, formats=allowed_formats())
    except UnidentifiedImageError as e:
        raise UnsupportedFormat(f"{path}: in no allowed image format ({allowed_text()})") from e
