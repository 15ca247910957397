"""The service under hostile input: refused formats, bounded decoding, slow clients, private libraries,
/images ids and paths, a corrupt index, and the Host header. Real photos, a real server on loopback."""

from __future__ import annotations

import io
import random
import shutil
import socket
import statistics
import subprocess
import time

import pytest

from tests.conftest import FLICKR, need_data
from tests.test_serve import build_test_index, check_error, start_server

httpx = pytest.importorskip("httpx")
TOKEN = "r" * 24


def photos(n=3):
    need_data()
    return sorted((FLICKR / "Flicker8k_Dataset").glob("*.jpg"))[:n]


def encoded(fmt: str, path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, fmt, **({"progressive": True} if fmt == "JPEG" else {}))
    return buf.getvalue()


HOSTILE = {
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n",
    "pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    "fits": b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 2800,
}


@pytest.fixture
def no_subprocess(monkeypatch):
    started = []

    def refuse(*a, **kw):
        started.append(a)
        raise AssertionError(f"a subprocess was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    return started


def test_refused_formats_never_reach_their_decoders(no_subprocess):
    from vlsearch.data.images import load_image
    from vlsearch.data.safe_decode import UnsupportedFormat, decode

    for data in HOSTILE.values():
        with pytest.raises(UnsupportedFormat, match="JPEG, PNG"):
            decode(data)
        with pytest.raises(ValueError):
            load_image(data)
    assert not no_subprocess


def test_many_scan_jpeg_bomb_and_deadline_refused():
    from PIL import Image

    from vlsearch.data.safe_decode import MAX_JPEG_SCANS, decode, jpeg_scans
    from vlsearch.errors import QueryError

    good = encoded("JPEG", photos(1)[0])
    assert 1 < jpeg_scans(good) <= MAX_JPEG_SCANS
    decode(good)
    # a progressive JPEG with thousands of (empty-looking) scans: refused before decoding
    head, tail = good[:-2], good[-2:]
    bomb = head + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 5000 + tail
    with pytest.raises(QueryError, match="scans"):
        decode(bomb)
    # a decompression bomb: more pixels than Pillow's default limit
    buf = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buf, "PNG")
    with pytest.raises(QueryError, match="Mpx"):
        decode(buf.getvalue())
    # a decode that outlives its budget is cut off between blocks
    big = io.BytesIO()
    Image.open(photos(1)[0]).convert("RGB").resize((4000, 3000)).save(big, "PNG")
    t0 = time.monotonic()
    with pytest.raises(QueryError, match="longer than"):
        decode(big.getvalue(), timeout=0.01)
    assert time.monotonic() - t0 < 1.0


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 40)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(1, len(b))]
    elif kind == 2:  # splice a chunk elsewhere
        i, j = sorted(rng.sample(range(len(b)), 2))
        b[rng.randrange(len(b)) :] = b[i:j]
    else:  # overwrite the header region
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(min(len(b), 64))] = rng.randrange(256)
    return bytes(b)


def test_fuzzed_images_decode_or_fail_cleanly_in_time(no_subprocess, private):
    """1,000 mutations of real JPEG, PNG and WebP photos through the upload decoder: each one is an
    image or a QueryError (a 4xx), never anything else, and each ends within its time limit. Every fifth
    one also goes to the live server's POST /search/image: a 200 or a JSON 4xx, never a 5xx."""
    from vlsearch.data.safe_decode import DECODE_TIMEOUT_S
    from vlsearch.errors import QueryError
    from vlsearch.serve.app import decode_upload

    rng = random.Random(0)
    seeds = [encoded(f, p) for p in photos(2) for f in ("JPEG", "PNG", "WEBP")]
    slowest, outcomes, statuses = 0.0, {"ok": 0, "refused": 0}, {}
    with private.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for i in range(1000):
            data = mutate(seeds[i % len(seeds)], rng)
            t0 = time.monotonic()
            try:
                decode_upload(data)
                outcomes["ok"] += 1
            except QueryError:
                outcomes["refused"] += 1
            slowest = max(slowest, time.monotonic() - t0)
            if i % 5 == 0:
                r = c.post("/search/image", params={"k": 1, "captions": 0}, files={"file": ("f", data)})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code == 200 or set(r.json()) == {"error", "detail"}, r.text[:200]
    assert slowest < DECODE_TIMEOUT_S + 0.5, slowest
    assert outcomes["refused"] > 100 and not no_subprocess, outcomes
    assert sum(statuses.values()) == 200 and all(code < 500 for code in statuses), statuses
    assert statuses.get(200, 0) > 20 and any(400 <= code < 500 for code in statuses), statuses


# -- the live service ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_dir(tiny_fast_checkpoint, mini_flickr, tmp_path_factory):
    return build_test_index(tmp_path_factory.mktemp("sec") / "idx", mini_flickr)


@pytest.fixture(scope="module")
def private(index_dir):
    from vlsearch.serve.gate import LOOPBACK_HOSTS

    s = start_server(index_dir, read_token=TOKEN, allowed_hosts=LOOPBACK_HOSTS)
    yield s
    s.stop()


def test_uploads_in_refused_formats_get_415_and_no_subprocess(private, no_subprocess):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with private.client(headers=auth) as c:
        for name, data in HOSTILE.items():
            body = check_error(c.post("/search/image", files={"file": (f"x.{name}", data)}), 415)
            assert "JPEG" in body["error"] and "HEIC" in body["error"]
        good = encoded("JPEG", photos(1)[0])
        assert c.post("/search/image", files={"file": ("q.jpg", good)}).status_code == 200
        assert c.get("/healthz").json()["load"]["heavy_in_flight"] == 0
    assert not no_subprocess


def test_private_library_token_cookie_throttle_and_host(private):
    with private.client() as c:
        check_error(c.get("/search", params={"q": "dog"}), 401)
        check_error(c.get("/images/0"), 401)
        page = c.get("/")
        assert page.status_code == 200 and 'action="/login"' in page.text
        h = c.get("/healthz").json()
        assert h["index"]["path"] is None and h["private"] is True
        r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN not in cookie
        assert c.get("/search", params={"q": "a dog"}).status_code == 200  # the cookie
        img = c.get("/images/0")
        assert img.status_code == 200 and img.headers["cache-control"].startswith("private")
    with private.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/healthz").json()["index"]["path"]
        check_error(c.get("/search", params={"q": "dog"}, headers={"Host": "evil.example"}), 400)
    with private.client(headers={"Authorization": "Bearer " + "x" * 24}) as c:
        codes = [c.get("/search", params={"q": "dog"}).status_code for _ in range(12)]
        assert codes[:10] == [401] * 10 and codes[-1] == 429


def test_image_ids_never_500(private):
    with private.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for path in ["/images/%C2%B2", "/images/" + "9" * 5000, "/images/%00", "/images/%EF%BF%BD"]:
            check_error(c.get(path), 404)


def test_explanations_capped(index_dir, slow_checkpoint):
    from vlsearch.serve.app import MAX_EXPLAINED, MAX_EXPLAINED_WORDS

    s = start_server(index_dir, rerank_model="slow")
    try:
        with s.client() as c:
            q = " ".join(["dog running grass ball park"] * 8)
            r = c.get("/search", params={"q": q, "k": 40, "rerank": 40, "explain": 1})
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            explained = [x for x in res if "explanation" in x]
            assert len(res) == 40 and len(explained) == MAX_EXPLAINED
            assert all(len(x["explanation"]["tokens"]) <= MAX_EXPLAINED_WORDS for x in explained)
    finally:
        s.stop()


def test_rerank_cache_miss_recomputes_features(index_dir, slow_checkpoint, tmp_path):
    from tests.test_serve import LiveServer
    from vlsearch.encoders.features import image_store
    from vlsearch.search.engine import SearchEngine
    from vlsearch.serve.app import ServeSettings, create_app

    engine = SearchEngine.open(index_dir, rerank_model="slow")
    fx = engine.reranker.extractor
    fx.images = image_store(fx.image_config, tmp_path / "empty-cache")  # a pruned / other cache
    s = LiveServer(create_app(engine, ServeSettings(rerank_model="slow")))
    try:
        with s.client() as c:
            r = c.get("/search", params={"q": "a dog", "k": 5, "rerank": 5})
            assert r.status_code == 200, r.text
            assert all(x["slow_score"] is not None for x in r.json()["results"])
    finally:
        s.stop()


def test_corrupt_metadata_is_a_degraded_state_not_500s(index_dir, tmp_path):
    from tests.test_serve import LiveServer
    from vlsearch.errors import IndexError_
    from vlsearch.index.gallery import GalleryIndex
    from vlsearch.search.engine import SearchEngine
    from vlsearch.serve.app import ServeSettings, create_app

    odd = tmp_path / "a#b?c%d" / "idx"  # once opened another database (string-built SQLite URI)
    shutil.copytree(index_dir, odd)
    GalleryIndex.open(odd).close()
    engine = SearchEngine.open(odd)
    (odd / "meta.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(IndexError_, match="meta.sqlite"):
        GalleryIndex.open(odd)
    s = LiveServer(create_app(engine, ServeSettings(rerank_note="off", warm_up=False)))
    try:
        with s.client() as c:
            h = c.get("/healthz").json()
            assert h["status"] == "degraded" and "meta.sqlite" in h["problem"]
            check_error(c.get("/search", params={"q": "dog"}), 503)
            check_error(c.get("/images/0"), 503)
    finally:
        s.stop()


def test_slow_clients_do_not_stop_a_normal_query(index_dir):
    """2,000 loopback sockets, idle or sending their headers a byte at a time, while queries run."""
    s = start_server(index_dir)
    try:
        with s.client() as c:

            def p50(n=15):
                times = []
                for i in range(n):
                    t0 = time.perf_counter()
                    assert c.get("/search", params={"q": f"a dog {i}", "k": 5}).status_code == 200
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)

            idle = p50()
            socks = []
            for i in range(2000):
                sk = socket.create_connection(("127.0.0.1", s.port))
                sk.setblocking(False)
                if i % 2:
                    sk.send(b"G")
                socks.append(sk)
            busy = []
            for rnd in range(3):  # bounded: three rounds of one more header byte each
                for sk in socks[1::2]:
                    try:
                        sk.send(b"ET /search?q=x HTTP/1.1\r\n"[rnd : rnd + 1])
                    except OSError:
                        pass
                busy.append(p50(5))
            loaded = statistics.median(busy)
            for sk in socks:
                sk.close()
        assert loaded < 3 * idle + 0.01, (idle, loaded)
    finally:
        s.stop()


def test_header_deadline_closes_silent_sockets(index_dir):
    from tests.test_serve import LiveServer
    from vlsearch.search.engine import SearchEngine
    from vlsearch.serve.app import ServeSettings, create_app

    s = LiveServer(create_app(SearchEngine.open(index_dir), ServeSettings(warm_up=False)), header_timeout=0.5)
    try:
        sk = socket.create_connection(("127.0.0.1", s.port))
        sk.send(b"GET /healthz HTTP/1.1\r\nHo")
        sk.settimeout(5)
        t0 = time.monotonic()
        assert sk.recv(100) == b""  # closed by the server, not answered
        assert time.monotonic() - t0 < 3
        sk.close()
    finally:
        s.stop()


def test_dataset_paths_may_not_leave_the_root(tmp_path):
    import json

    from vlsearch.data.datasets import load_karpathy
    from vlsearch.errors import DataError

    (tmp_path / "images").mkdir()
    for bad in ["../../etc/passwd", "/etc/passwd"]:
        data = {"images": [{"filename": bad, "split": "val", "sentences": [{"raw": "x"}]}]}
        (tmp_path / "d.json").write_text(json.dumps(data))
        with pytest.raises(DataError, match="leaves the dataset folder"):
            load_karpathy(tmp_path / "d.json", tmp_path / "images", "dev")


def photo_folder_and_a_secret(tmp_path):
    """photos/{a,b}.jpg, and elsewhere/secret.jpg outside it."""
    folder, outside = tmp_path / "photos", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    a, b, c = photos(3)
    shutil.copy(a, folder / "a.jpg")
    shutil.copy(b, folder / "b.jpg")
    shutil.copy(c, outside / "secret.jpg")
    return folder, outside


def test_symlinks_out_of_a_folder_are_not_indexed_nor_served(tiny_fast_checkpoint, tmp_path):
    """A link planted in a photo folder, pointing at a file elsewhere, is left out of the index; with
    --follow-symlinks it is indexed and served, and a server that overrides that serves only files inside
    the index's roots."""
    from vlsearch.cli import main
    from vlsearch.index.gallery import GalleryIndex, read_records

    folder, outside = photo_folder_and_a_secret(tmp_path)
    (folder / "link.jpg").symlink_to(outside / "secret.jpg")
    (folder / "inner.jpg").symlink_to(folder / "a.jpg")  # a link that stays inside is fine

    safe = tmp_path / "safe"
    assert main(["index", str(folder), "--out", str(safe), "--quiet"]) == 0
    index = GalleryIndex.open(safe)
    assert sorted(r.id for r in read_records(index)) == ["a.jpg", "b.jpg", "inner.jpg"]
    assert index.config.roots == [str(folder.resolve())] and index.config.follow_symlinks is False
    index.close()

    linked = tmp_path / "linked"
    assert main(["index", str(folder), "--out", str(linked), "--follow-symlinks", "--quiet"]) == 0
    index = GalleryIndex.open(linked)
    assert "link.jpg" in [r.id for r in read_records(index)] and index.config.follow_symlinks is True
    index.close()
    for follow, code in ((None, 200), (False, 404)):
        s = start_server(linked, follow_symlinks=follow)
        try:
            with s.client() as cl:
                assert cl.get("/images/a.jpg").status_code == 200
                assert cl.get("/images/link.jpg").status_code == code
        finally:
            s.stop()


def test_an_index_from_before_roots_serves_only_its_source_folder(tiny_fast_checkpoint, tmp_path):
    """An index whose config records no roots (older ones, and `--ray` builds until now) is served from
    the folder it was built from: a row pointing elsewhere (as a hostile dataset JSON could have made)
    answers 404. Its next write records that folder as its roots."""
    import json
    import sqlite3

    from vlsearch.cli import main
    from vlsearch.index.gallery import GalleryIndex

    folder, outside = photo_folder_and_a_secret(tmp_path)
    out = tmp_path / "idx"
    assert main(["index", str(folder.resolve()), "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    del cfg["config"]["roots"]  # as written before roots existed
    (out / "config.json").write_text(json.dumps(cfg))
    db = sqlite3.connect(out / "meta.sqlite")
    db.execute("UPDATE images SET path = ? WHERE id = 'b.jpg'", (str(outside / "secret.jpg"),))
    db.commit()
    db.close()
    s = start_server(out)
    try:
        with s.client() as cl:
            assert cl.get("/images/a.jpg").status_code == 200
            assert cl.get("/images/b.jpg").status_code == 404
    finally:
        s.stop()
    assert main(["index", "--remove", "a.jpg", "--out", str(out)]) == 0  # a write: roots recorded
    index = GalleryIndex.open(out)
    assert index.config.roots == [str(folder.resolve())]
    index.close()
