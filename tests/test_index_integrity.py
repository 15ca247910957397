"""Index integrity: `vlsearch index` killed with SIGKILL mid-way leaves the previous index at --out intact
(it still opens and answers), and a re-run resumes from the feature cache instead of starting over.

The fast test lowers the feature cache's chunk size (512 images per chunk in production) to 32 through a
one-line wrapper around the real CLI, so a chunk is committed after the first batch of 64 images; the slow
test runs the `vlsearch` command unchanged over 600 images.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FLICKR, link_photo

REPO = Path(__file__).resolve().parents[1]
SMALL_CHUNKS = (
    "import sys, vlsearch.encoders.features as f; f.CHUNK = 32; "
    "from vlsearch.cli import main; sys.exit(main())"
)


def photo_folder(tmp_path: Path, n: int, skip: int) -> Path:
    """n real Flickr8k train photos the session has not seen (the mini split uses the first 60)."""
    names = (FLICKR / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()[skip : skip + n]
    folder = tmp_path / f"photos-{n}"
    folder.mkdir()
    for name in names:
        link_photo(FLICKR / "Flicker8k_Dataset" / name, folder / name)
    return folder


def cached(keys: list[str]) -> int:
    """How many of these images the feature cache holds (read the way a second process would)."""
    from vlsearch.encoders.features import image_store

    db = sqlite3.connect(f"file:{image_store().root / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        have = 0
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = f"SELECT COUNT(*) FROM items WHERE key IN ({','.join('?' * len(part))})"
            have += db.execute(q, part).fetchone()[0]
        return have
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        db.close()


def extracted_total(stderr: str) -> int:
    """The size of the 'image features' progress bar: how many images the run had to extract."""
    totals = [int(m.group(2)) for m in re.finditer(r"image features:.*?(\d+)/(\d+)", stderr)]
    return max(totals, default=0)


def run_kill_resume(cmd_prefix: list[str], folder: Path, out: Path, mini_flickr, timeout: float):
    import vlsearch
    from vlsearch.encoders.features import file_key
    from vlsearch.index.build import build_index
    from vlsearch.index.gallery import GalleryIndex

    # the previous index at --out, and what it answers
    build_index(out, mini_flickr, "dev", progress=False)
    before = [h.id for h in vlsearch.load(out).search("a dog runs on the grass", k=5).hits]
    keys = [file_key(p) for p in sorted(folder.iterdir())]
    assert cached(keys) == 0, "these photos must be new to the feature cache"

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [*cmd_prefix, "index", str(folder), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while cached(keys) == 0:
            assert proc.poll() is None, f"`vlsearch index` ended (rc {proc.returncode}) before it was killed"
            assert time.time() < deadline, "no feature chunk was committed in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = cached(keys)
    assert 0 < done < len(keys), f"killed too late: {done} of {len(keys)} extracted"

    # the previous index is intact: it opens, has its 40 images and answers as before
    idx = GalleryIndex.open(out)
    assert idx.config.n_images == 40 and len(idx.images) == 40
    idx.close()
    assert [h.id for h in vlsearch.load(out).search("a dog runs on the grass", k=5).hits] == before

    # the re-run resumes: it extracts only what the killed run had not committed
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert extracted_total(rerun.stderr) == len(keys) - done
    assert cached(keys) == len(keys)
    idx = GalleryIndex.open(out)
    assert idx.config.n_images == len(keys)
    idx.close()
    assert len(vlsearch.load(out).search("a dog runs on the grass", k=5).hits) == 5
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers
    return done


def test_killed_index_run_keeps_old_index_and_resumes(tiny_fast_checkpoint, mini_flickr, tmp_path):
    folder = photo_folder(tmp_path, 160, skip=2000)
    done = run_kill_resume(
        [sys.executable, "-c", SMALL_CHUNKS], folder, tmp_path / "idx", mini_flickr, timeout=300
    )
    assert done % 32 == 0  # whole chunks (CHUNK = 32 here), committed one by one


@pytest.mark.slow
def test_killed_index_run_full_chunks(tiny_fast_checkpoint, mini_flickr, tmp_path):
    folder = photo_folder(tmp_path, 600, skip=3000)
    exe = Path(sys.executable).with_name("vlsearch")
    done = run_kill_resume([str(exe)], folder, tmp_path / "idx", mini_flickr, timeout=900)
    assert done == 512


def test_the_cli_offers_every_vector_index_kind():
    """settings.VECTOR_INDEX_KINDS (what `vlsearch index --kind` and `eval --index` offer without loading
    faiss) names exactly the kinds index/vectors.py implements."""
    from vlsearch.index.vectors import KINDS
    from vlsearch.settings import VECTOR_INDEX_KINDS

    assert tuple(KINDS) == VECTOR_INDEX_KINDS


def test_auto_picks_the_kind_by_gallery_size():
    """Exact search for small galleries, then HNSW, fp16 IVF lists, and PQ codes only when fp16 codes would
    not fit in memory (the thresholds' reasons are in index/vectors.py)."""
    from vlsearch.index import vectors as V

    for n, want in (
        (1_000, "flat"),
        (V.AUTO_THRESHOLD, "hnsw"),
        (V.AUTO_IVF_THRESHOLD, "ivfsq"),
        (V.AUTO_IVFPQ_THRESHOLD, "ivfpq"),
    ):
        assert V.make_vector_index(64, n, "auto").kind == want, n


def test_inner_products_of_stored_rows_match_numpy(tmp_path):
    """The re-check and filtered scores (vectors.inner_products, on PyTorch's threads) equal numpy's
    matmul, for a read-only slice of a memory-mapped fp16 file and for gathered rows."""
    import numpy as np

    from vlsearch.index.vectors import inner_products

    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((500, 48)).astype(np.float16))
    emb = np.load(tmp_path / "e.npy", mmap_mode="r")
    q = rng.standard_normal(48).astype(np.float32)
    for rows in (emb[100:300], emb[np.array([3, 499, 7])]):
        want = np.asarray(rows, np.float32) @ q
        got = inner_products(rows, q[None])
        assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-4)


def test_ivf_single_queries_match_the_batch():
    """One query searches its lists on every core (faiss parallel_mode 1), a batch splits its queries
    (mode 0): the same rows and scores either way."""
    import numpy as np

    from vlsearch.index.vectors import make_vector_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind in ("ivfflat", "ivfsq", "ivfpq"):
        index = make_vector_index(32, len(x), kind)
        index.add(x)
        q = x[:20] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)
        batch_scores, batch_rows = index.search(q, 10)
        for i in range(len(q)):
            scores, rows = index.search(q[i : i + 1], 10)
            assert (rows[0] == batch_rows[i]).all()
            assert np.allclose(scores[0], batch_scores[i], atol=1e-6)


def test_openmp_workers_spin_briefly_unless_the_user_says_otherwise():
    """Importing vlsearch before torch shortens libgomp's idle spin (settings.short_openmp_spin) for
    every OpenMP runtime the process loads (PyTorch's, which faiss's loops run on, and faiss's own); a
    GOMP_SPINCOUNT the user set is kept."""
    from vlsearch.settings import OPENMP_SPINCOUNT

    code = "import vlsearch.index.vectors, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for preset, want in ((None, OPENMP_SPINCOUNT), ("50000", "50000")):
        env = {**base, "OMP_DISPLAY_ENV": "verbose"}  # libgomp prints its settings when it loads
        if preset:
            env["GOMP_SPINCOUNT"] = preset
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        spins = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", run.stderr)
        assert len(spins) == 2 and set(spins) == {want}, run.stderr  # PyTorch's libgomp and faiss's
