"""The service state behind the routes: the engine, index freshness and health, which files may be
served, and the search and write calls that run on the model pool's threads."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from vlsearch.errors import IndexError_, QueryError, VLSearchError
from vlsearch.index.plain import index_roots
from vlsearch.search.engine import MAX_K, MAX_RERANK, SearchEngine
from vlsearch.serve.admission import ModelPool
from vlsearch.serve.encoding import PIL_SUFFIX, decode_upload, image_url
from vlsearch.serve.errors import Unavailable
from vlsearch.serve.limits import MAX_EXPLAINED, MAX_EXPLAINED_WORDS, ServeSettings
from vlsearch.version import __version__

log = logging.getLogger("vlsearch.serve")


class Service:
    def __init__(self, engine: SearchEngine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.fingerprint = engine.index.config.model_fingerprint
        self.model_name = engine.index.config.model
        self.started = time.time()
        self.pool = ModelPool(
            settings.workers, settings.threads_per_worker, settings.max_queue, settings.max_rerank_queue
        )
        self._refresh_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.stale: str | None = None  # set when the index on disk was rebuilt with another model
        self.refreshes = 0
        self._seen_index = engine.index
        self.broken: str | None = None  # the index cannot be read: searches answer 503 with this
        self.unscored = 0  # re-ranked results that kept their Fast score (image file gone)
        try:
            engine.index.check_integrity()
        except VLSearchError as e:
            self.broken = str(e)
        if engine.reranker is not None:
            if hasattr(engine.reranker, "locate"):
                engine.reranker.locate = lambda keys: self.engine.index.paths_of_keys(keys)

    @property
    def rerank_enabled(self) -> bool:
        return self.engine.reranker is not None

    @property
    def uploads_dir(self) -> Path:
        """Uploaded files live beside the index folder (the index folder itself is swapped on write)."""
        path = self.engine.path
        return path.with_name(path.name + ".uploads")

    # freshness: picks up `vlsearch index --add` by another process and our own POST /images
    def refresh(self) -> None:
        if not self._refresh_lock.acquire(blocking=False):
            return  # another thread is reopening; this request uses the index as it was
        try:
            self.engine.refresh()
            if self.engine.index is not self._seen_index:  # reopened, here or by engine.add
                self._seen_index = self.engine.index
                self.refreshes += 1
                cfg = self.engine.index.config
                if cfg.model_fingerprint != self.fingerprint:
                    self.stale = (
                        f"the index at {self.engine.path} was rebuilt with another model "
                        f"({cfg.model!r}, {cfg.model_fingerprint}); restart `vlsearch serve`"
                    )
                else:
                    self.stale = None
                log.info("index reloaded: %d images", len(self.engine.index.images))
        except VLSearchError as e:  # mid-swap or removed: keep serving what we have
            log.warning("index not reloaded: %s", e)
        except Exception as e:  # noqa: BLE001 - never let a reload take the service down
            log.warning("index not reloaded (%s: %s)", type(e).__name__, e)
        finally:
            self._refresh_lock.release()
        if self.stale:
            raise IndexError_(self.stale)
        if self.broken:
            raise Unavailable(self.broken)

    def guarded(self, fn):
        """Run index work; an unreadable index (sqlite or faiss failing under us) becomes the degraded
        state with its reason, and 503s, instead of a 500 on every request."""
        try:
            return fn()
        except sqlite3.Error as e:
            self.broken = f"the index metadata at {self.engine.path} is unreadable ({e}); rebuild it with `vlsearch index`"
            raise Unavailable(self.broken) from e

    def warm_up(self) -> None:
        """Load the lazily built backbones (and tokenizer settings) before the first user waits."""
        from PIL import Image

        self.engine.search("a warm up query", 1)
        self.engine.search_image(Image.new("RGB", (64, 64), (120, 120, 120)), 1)

    # model work (runs on a pool thread)
    def text_search(self, text: str, k: int, rerank: int, explain: bool, why: bool = False, **options):
        """Explanations cost ~200 floats per word per result: the engine ranks without them, and only
        the first MAX_EXPLAINED results are explained (the same pairs, so the same maps). With ``why``
        the concept tags are made in the same pool job (``result.concept_tags``)."""
        self.refresh()
        result = self.guarded(
            lambda: _retry_borrowed(lambda: self.engine.search(text, k, rerank=rerank, **options))
        )
        if explain:
            top = result.hits[:MAX_EXPLAINED]
            keys = [r.key for r in self.engine.index.records([h.row for h in top])]
            fast = np.array([h.fast_score for h in top], np.float32)
            _, _, maps = _retry_borrowed(
                lambda: self.engine.reranker.rerank_text(text, keys, fast, explain=True)
            )
            result.explanations = [_cap_words(m) for m in maps] + [None] * (len(result.hits) - len(top))
        self.unscored += sum(1 for h in result.hits if rerank and not np.isfinite(h.slow_score))
        result.concept_tags = self.concept_tags(text, result.hits) if why else None
        return result

    def concept_tags(self, text: str, hits) -> list:
        """Per hit, the ImageNet concepts that drove it (vlsearch.search.why); [] without a channel."""
        from vlsearch.search.why import concept_tags

        keys = [r.key for r in self.engine.index.records([h.row for h in hits])]
        try:
            return concept_tags(self.engine.embedder, text, keys)
        except KeyError:  # a feature-cache miss (index built elsewhere, pruned cache): no tags, not a 500
            return [[] for _ in keys]

    def image_search(self, data: bytes, k: int, k_captions: int):
        self.refresh()
        image = decode_upload(data)
        return self.guarded(lambda: self._image_search(image, k, k_captions))

    def _image_search(self, image, k: int, k_captions: int):
        images = self.engine.search_image(image, k)
        captions = self.engine.captions_for_image(image, k_captions) if k_captions else None
        cap_rows = {}
        if captions is not None and captions.hits:
            rows = sorted({c.image_row for c in captions.hits})
            cap_rows = dict(zip(rows, self.engine.index.records(rows), strict=True))
        return images, captions, cap_rows

    def lookup_image(self, ref: str):
        index = self.engine.index
        row = self.guarded(lambda: index.row_of_id(ref))
        if row is None and ref.isascii() and ref.isdigit() and len(ref) < 12 and int(ref) < len(index.images):
            row = int(ref)
        return None if row is None else self.guarded(lambda: index.record(row))

    def servable(self, path: Path) -> bool:
        """Inside the index's roots (or its uploads) and not through a symlink, unless the index was built
        with --follow-symlinks (or the server runs with it): a link planted in a photo folder, or an index
        entry pointing elsewhere, must not serve files from elsewhere on the machine."""
        config = self.engine.index.config
        follow = self.settings.follow_symlinks
        if follow is None:
            follow = bool(getattr(config, "follow_symlinks", False))
        if follow:
            return True
        if any(p.is_symlink() for p in [path, *path.parents][:-1] if p.name):
            return False
        roots = index_roots(config)  # recorded, or for an older index the folder it was built from
        if not roots:  # an older index that names no folder: the symlink rule alone
            return True
        real = path.resolve()
        return any(real.is_relative_to(Path(r)) for r in [*roots, str(self.uploads_dir.resolve())])

    def add_images(self, uploads: list[tuple[str, bytes]]) -> dict:
        """Store each upload under a content-hash name beside the index, extract its features with the
        loaded backbone, and add it to the index (atomic swap); the engine sees it at once."""
        with self._write_lock:
            self.refresh()
            folder = self.uploads_dir
            folder.mkdir(parents=True, exist_ok=True)
            saved = []
            for name, data in uploads:
                image = decode_upload(data)
                suffix = PIL_SUFFIX.get(image.format or "", ".img")
                if suffix == ".img":
                    raise QueryError(f"{name}: unsupported image format {image.format}")
                path = folder / (hashlib.sha1(data).hexdigest() + suffix)
                if not path.exists():
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                saved.append((name, path))
            before = len(self.engine.index.images)
            # the loaded backbone fills the feature cache, so add_to_index finds everything cached
            self.engine.embedder.extractor.image_keys([p for _, p in saved])
            added = self.engine.add([p for _, p in saved])
            self.refresh()
            index = self.engine.index
            out = []
            for name, path in saved:
                row = index.row_of_id(path.name)
                out.append(
                    {
                        "filename": name,
                        "id": path.name,
                        "row": row,
                        "url": image_url(path.name),
                        "new": row is not None and row >= before,
                    }
                )
            return {"added": added, "n_images": len(index.images), "images": out}

    def remove_images(self, ids: list[str]) -> list[str]:
        """Delete by id (tombstones in the index manifest); the engine sees it at once."""
        with self._write_lock:
            removed = self.engine.remove(ids)
            self.refresh()
            return removed

    def health(self, authorised: bool = False) -> dict:
        """Paths (of the index, in problems) only for a caller with a token."""
        cfg = self.engine.index.config
        problem = self.stale or self.broken
        if problem and not authorised:
            problem = problem.replace(str(self.engine.path), "<index>")
        return {
            "status": "degraded" if problem else "ok",
            "problem": problem,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "index": {
                "path": str(self.engine.path) if authorised else None,
                "n_images": len(self.engine.index.images),
                "n_captions": cfg.n_captions,
                "model": self.model_name,
                "kind": cfg.kind,
                "source": cfg.source,
                "reloads": self.refreshes,
            },
            "rerank": {
                "enabled": self.rerank_enabled,
                "model": self.settings.rerank_model if self.rerank_enabled else None,
                "note": None if self.rerank_enabled else self.settings.rerank_note,
                "max": MAX_RERANK,
                "max_explained": MAX_EXPLAINED,
                "unscored_results": self.unscored,
            },
            "write": {"enabled": bool(self.settings.write_token)},
            "private": bool(self.settings.read_token),
            "limits": {
                "max_k": MAX_K,
                "max_upload_bytes": self.settings.max_upload_bytes,
                "page_k": self.settings.page_k,
                "page_rerank": min(self.settings.page_rerank, MAX_RERANK),
            },
            "load": self.pool.stats(),
        }


def _retry_borrowed(fn):
    """A fast tokenizer shared by threads can refuse a concurrent call ("Already borrowed"): retry once."""
    try:
        return fn()
    except RuntimeError as e:
        if "borrow" not in str(e).lower():
            raise
        time.sleep(0.005)
        return fn()


def _cap_words(explanation: dict | None) -> dict | None:
    if explanation is None:
        return None
    n = MAX_EXPLAINED_WORDS
    return {**explanation, "tokens": explanation["tokens"][:n], "maps": explanation["maps"][:n]}
