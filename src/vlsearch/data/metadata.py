"""What a photo says about itself, for the filters people search with: when (EXIF DateTimeOriginal, else
the file's mtime), which camera, where (GPS), in which folder, and how big."""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from vlsearch.data.safe_decode import open_header

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATETIME_ORIGINAL, DATETIME = 36867, 306
MAKE, MODEL = 271, 272


@dataclass
class PhotoMeta:
    taken: float | None = None  # unix seconds (EXIF local time read as UTC: what the camera showed)
    taken_source: str = ""  # "exif" or "mtime"
    make: str = ""
    model: str = ""
    lat: float | None = None
    lon: float | None = None
    folder: str = ""
    width: int | None = None
    height: int | None = None
    bytes: int | None = None

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def row(self) -> tuple:
        return astuple(self)

    @property
    def camera(self) -> str:
        make, model = self.make.strip(), self.model.strip()
        return model if make and model.lower().startswith(make.lower()) else f"{make} {model}".strip()


def exif_time(text) -> float | None:
    """'2021:07:04 18:30:05' -> unix seconds, None when absent or malformed (cameras write '0000:00:00')."""
    if not text:
        return None
    text = str(text).strip("\x00 ")
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M"):
        try:
            return datetime.strptime(text[:19], fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


def _degrees(value, ref) -> float | None:
    try:
        d, m, s = (float(x) for x in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    deg = d + m / 60 + s / 3600
    return -deg if str(ref).strip("\x00 ").upper() in ("S", "W") else deg


def read_metadata(path: str | Path, image_id: str = "") -> PhotoMeta:
    """Metadata of one image file; ``folder`` is the folder part of its id (its path relative to the
    folder indexed). Fields the file lacks stay empty; a bad EXIF block is not an error."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return PhotoMeta(folder=os.path.dirname(image_id))
    meta = PhotoMeta(
        taken=st.st_mtime, taken_source="mtime", folder=os.path.dirname(image_id), bytes=st.st_size
    )
    try:
        with open_header(path) as img:
            meta.width, meta.height = img.size
            exif = img.getexif()
            sub = exif.get_ifd(EXIF_IFD)
            taken = exif_time(sub.get(DATETIME_ORIGINAL)) or exif_time(exif.get(DATETIME))
            if taken is not None:
                meta.taken, meta.taken_source = taken, "exif"
            meta.make = str(exif.get(MAKE, "") or "").strip("\x00 ")
            meta.model = str(exif.get(MODEL, "") or "").strip("\x00 ")
            gps = exif.get_ifd(GPS_IFD)
            if gps and 2 in gps and 4 in gps:
                meta.lat, meta.lon = _degrees(gps[2], gps.get(1, "N")), _degrees(gps[4], gps.get(3, "E"))
                if meta.lat is None or meta.lon is None or not (-90 <= meta.lat <= 90):
                    meta.lat = meta.lon = None
    except Exception:  # noqa: BLE001 - unreadable images are reported by the decoder, not here
        pass
    return meta
