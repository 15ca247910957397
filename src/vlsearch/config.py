"""Typed configs saved beside every artefact (checkpoint, index, feature cache) so it says how it was made."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from vlsearch.errors import VLSearchError
from vlsearch.version import FORMAT_VERSION, __version__

T = TypeVar("T")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict) -> T:
    """Build a dataclass from a dict, rejecting unknown keys (a sign of another version's config)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise VLSearchError(
            f"{cls.__name__}: unknown config keys {sorted(unknown)} (made by another version?)"
        )
    return cls(**data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha1(path: Path) -> str:
    """sha1 hex digest of a file's bytes, read in 1 MiB blocks (cache keys, checkpoint fingerprints)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_npz(path: Path, **arrays) -> None:
    """A disk cache entry of numpy arrays, written atomically (np.savez into memory, then renamed)."""
    import numpy as np  # here, not at the top: a foundation module that stays free of numpy on import

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: Path) -> dict | None:
    """The arrays of a cache entry written by ``write_npz``, or None when there is none yet."""
    import numpy as np  # see write_npz

    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def stamp() -> dict:
    """What every saved artefact records about the code that made it."""
    return {"vlsearch_version": __version__, "format_version": FORMAT_VERSION}


def check_stamp(meta: dict, what: str, path: Path, error: type[Exception] = VLSearchError) -> None:
    fmt = meta.get("format_version")
    if fmt != FORMAT_VERSION:
        raise error(
            f"{what} at {path} has format version {fmt!r} (made by vlsearch {meta.get('vlsearch_version', '?')}), "
            f"but this vlsearch {__version__} reads format {FORMAT_VERSION}: rebuild it with this version."
        )
