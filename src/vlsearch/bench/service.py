"""The service's peak memory: ``vlsearch serve`` over the largest gallery, its RSS sampled while it answers.

When the service is not part of this install (no ``vlsearch.serve``), the engine's RSS in this process is
reported instead (stated so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vlsearch.bench.util import PeakRSS, rss_bytes, summarize
from vlsearch.config import atomic_write_json
from vlsearch.index.gallery import GalleryIndex
from vlsearch.search.engine import SearchEngine


def serving_folder(gallery: Path, kind: str, out: Path) -> Path:
    """An index folder over the bench gallery with ``kind`` as its vector index (files linked, not copied)."""

    out.mkdir(parents=True, exist_ok=True)
    gallery = gallery.resolve()  # symlink targets must not be relative to the caller's working directory
    for name in ("meta.sqlite", "embeddings.npy"):
        (out / name).symlink_to(gallery / name)
    src = gallery / ("images.faiss" if kind == "flat" else f"images.{kind}.faiss")
    (out / "images.faiss").symlink_to(src)
    meta = json.loads((gallery / "config.json").read_text())
    meta["config"]["kind"] = kind
    atomic_write_json(out / "config.json", meta)
    GalleryIndex.open(out).close()  # fails here, not in the service, if inconsistent
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 60.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def service_rss(folder: Path, texts: list[str], rerank: int = 50, timeout: float = 300.0) -> dict:
    """Start ``vlsearch serve`` on ``folder``, send the queries (Fast, then Fast+Slow if it re-ranks),
    sample the process's RSS every 20 ms; stop it. Peak RSS and client-side latencies."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vlsearch.cli", "serve", "--index", str(folder), "--port", str(port)]
    cmd += ["--log-level", "warning"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with PeakRSS(proc.pid, children=True) as peak:
            t0 = time.perf_counter()
            health = None
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"vlsearch serve exited: {proc.stderr.read()[-2000:]}")
                try:
                    health = _get(base + "/healthz", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            if health is None:
                raise RuntimeError("vlsearch serve did not answer /healthz in time")
            startup_s = time.perf_counter() - t0
            idle_rss = rss_bytes(proc.pid, children=True)
            fast_ms, rerank_ms, server_ms = [], [], []
            for t in texts:
                t1 = time.perf_counter()
                r = _get(f"{base}/search?{urllib.parse.urlencode({'q': t, 'k': 10})}")
                fast_ms.append(1e3 * (time.perf_counter() - t1))
                server_ms.append(r.get("timings_ms", {}).get("server", 0.0))
            reranks = False
            if rerank:
                try:
                    for t in texts:
                        t1 = time.perf_counter()
                        _get(f"{base}/search?{urllib.parse.urlencode({'q': t, 'k': 10, 'rerank': rerank})}")
                        rerank_ms.append(1e3 * (time.perf_counter() - t1))
                    reranks = True
                except urllib.error.HTTPError:
                    reranks = False  # the service has no re-ranker (no trained Slow checkpoint)
        return {
            "how": "vlsearch serve (subprocess), RSS of the process tree sampled every 20 ms",
            "index": str(folder),
            "startup_s": startup_s,
            "idle_rss_gb": idle_rss / 1e9,
            "peak_rss_gb": peak.peak / 1e9,
            "fast_http": summarize(fast_ms),
            "fast_server_p50_ms": float(sorted(server_ms)[len(server_ms) // 2]) if server_ms else None,
            "fast_slow_http": summarize(rerank_ms) if reranks else None,
            "rerank_K": rerank if reranks else None,
            "health": {k: v for k, v in (health or {}).items() if isinstance(v, str | int | float | bool)},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engine_rss(folder: Path, embedder, texts: list[str]) -> dict:
    """Fallback without the service: open the index in this process, query it, sample this process's RSS."""

    before = rss_bytes()
    with PeakRSS() as peak:
        engine = SearchEngine(GalleryIndex.open(folder), embedder)
        for t in texts:
            engine.search(t, k=10)
    engine.index.close()
    return {
        "how": "engine in the bench process (vlsearch.serve not available): RSS increase while open + queried",
        "index": str(folder),
        "peak_rss_gb": peak.peak / 1e9,
        "rss_increase_gb": (peak.peak - before) / 1e9,
    }


def measure(gallery: Path, kind: str, work: Path, embedder, texts: list[str], rerank: int = 50) -> dict:
    folder = serving_folder(gallery, kind, work / f"serve-{kind}")
    try:
        if importlib.util.find_spec("vlsearch.serve.app") is not None:
            try:
                return {"kind": kind, **service_rss(folder, texts, rerank)}
            except Exception as e:  # noqa: BLE001 - report, then fall back to the in-process figure
                out = engine_rss(folder, embedder, texts)
                return {"kind": kind, **out, "service_error": f"{type(e).__name__}: {e}"}
        return {"kind": kind, **engine_rss(folder, embedder, texts)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
