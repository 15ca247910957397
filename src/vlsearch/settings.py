"""Where things live: data root, feature cache, checkpoints and indexes. Environment variables override."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Text queries are truncated to this many word-pieces by the tokenizer; longer input is rejected above
# MAX_QUERY_CHARS so a pasted book cannot tie up a worker.
MAX_QUERY_CHARS = 2000

# The vector index kinds (index/vectors.py), named here so the CLI can offer them without loading faiss.
VECTOR_INDEX_KINDS = ("flat", "hnsw", "ivfflat", "ivfsq", "ivfpq")


def home() -> Path:
    """Root for caches, default checkpoints and indexes (``$VLSEARCH_HOME``, else ``~/.cache/vlsearch``)."""
    env = os.environ.get("VLSEARCH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlsearch"


def data_root() -> Path:
    """Default data root: ``$VLSEARCH_DATA``, else ``../shared/data`` beside the repo or the working directory."""
    env = os.environ.get("VLSEARCH_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    candidates += [parent / ".." / "shared" / "data" for parent in here.parents[:4]]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def cache_dir() -> Path:
    return home() / "features"


def models_dir() -> Path:
    return home() / "models"


def checkpoint_out(out: str | Path | None, name: str) -> Path:
    """Where `vlsearch train --out OUT` saves model ``name``: OUT as a path when it is absolute or has a
    folder part, else a name under the models folder; no OUT: the model's own name there."""
    if out is None:
        return models_dir() / name
    path = Path(out).expanduser()
    return path if (path.is_absolute() or len(path.parts) > 1) else models_dir() / str(out)


def default_index_dir() -> Path:
    return home() / "indexes" / "default"


# What every vlsearch process runs with unless the environment says otherwise: the backbones ship in
# packages, so the Hugging Face hub is never asked (and a missing file fails at once, not after a timeout).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def set_offline(env: dict | None = None) -> dict:
    """Apply OFFLINE_ENV to ``env`` (default: this process's environment) where not already set."""
    env = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    return env


def model_threads() -> int:
    """Intra-op threads for model work: ``$VLSEARCH_THREADS``, else every core."""
    return int(os.environ.get("VLSEARCH_THREADS", os.cpu_count() or 1))


# Spins of an idle OpenMP worker before it sleeps (libgomp's default is 300,000).
OPENMP_SPINCOUNT = "10000"


def short_openmp_spin() -> bool:
    """Let idle OpenMP workers sleep soon after a parallel region, before PyTorch loads its libgomp.

    faiss runs its parallel loops on PyTorch's libgomp (PyTorch loads it with global symbols), so after
    an IVF search of one query the workers spin for libgomp's default 300,000 turns and take the second
    core from the text encoder of the next query: at 1M images (IVF-Flat) encode + search took 5.0-5.3
    ms, 4.5-4.6 with 10,000 turns; one text x 50 Slow pairs is unchanged (docs/bench.md). libgomp reads
    the variable once, when it is loaded, so this runs when the package is imported and does nothing once
    torch is. A ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` already set wins. Returns whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT  # inherited by the workers this process starts
    return True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next tensor instead of handing it back to the kernel.

    A re-ranking query allocates tens of MB of short-lived tensors (keys and values of 50 images). glibc
    returns such blocks to the kernel on free (mmap below 32 MB is dynamic, the heap top is trimmed), so
    every query pays the page faults of touching fresh memory again: on the bench VM that was a third of
    a Fast+Slow query (docs/bench.md). Blocks up to 32 MB now come from a heap that is never trimmed;
    larger ones are still mmapped and freed at once. The resident size stays at its peak, which a
    service reaches on its first queries anyway. ``VLSEARCH_MALLOC=default`` leaves glibc alone; other
    C libraries are left alone. Returns whether the setting was applied."""
    global _allocator_tuned
    if _allocator_tuned or os.environ.get("VLSEARCH_MALLOC", "").strip().lower() == "default":
        return _allocator_tuned
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        ok = ok and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def configure_torch() -> None:
    """Offline hub access, both cores for intra-op work, and an allocator that keeps freed memory."""
    set_offline()
    keep_freed_memory()
    import torch  # here: settings is a foundation that `vlsearch --help` imports without torch

    threads = model_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
