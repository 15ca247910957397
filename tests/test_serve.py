"""The search service over a real tiny model and index: a real uvicorn server on a loopback port, httpx.

Covers the API, bad input of every kind (each a 4xx JSON error, the service staying up), uploads and
their size cap, adding images with a write token, picking up an index changed on disk, load shedding,
the load script, and start-up errors of `vlsearch serve` (exit 2, no traceback).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]


# -- helpers shared with test_browser.py ----------------------------------------------------------------
class LiveServer:
    """A real uvicorn server in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app, **config):
        import uvicorn

        from vlsearch.serve.protocol import uvicorn_config

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn_config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, **config)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def build_test_index(out: Path, mini_flickr) -> Path:
    from vlsearch.index.build import build_index

    if not (out / "config.json").exists():
        build_index(out, mini_flickr, "dev", progress=False)
    return out


def start_server(index_dir, rerank_model=None, **settings) -> LiveServer:
    """The app over a freshly opened engine, with the real Slow re-ranker when rerank_model is given."""
    from vlsearch.search.engine import SearchEngine
    from vlsearch.serve.app import ServeSettings, create_app

    engine = SearchEngine.open(index_dir, rerank_model=rerank_model)
    opts = {"rerank_model": rerank_model, "rerank_note": "" if rerank_model else "no Slow model in this test"}
    opts.update(settings)
    return LiveServer(create_app(engine, ServeSettings(**opts)))


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_dir(tiny_fast_checkpoint, mini_flickr, tmp_path_factory):
    return build_test_index(tmp_path_factory.mktemp("serve") / "idx", mini_flickr)


@pytest.fixture(scope="module")
def server(index_dir):
    s = start_server(index_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rerank_server(index_dir, slow_checkpoint):
    s = start_server(index_dir, rerank_model="slow")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def photo(index_dir):
    from vlsearch.index.gallery import GalleryIndex

    idx = GalleryIndex.open(index_dir)
    rec = idx.record(3)
    idx.close()
    return rec, Path(rec.path).read_bytes()


def check_error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    return body


# -- the API ------------------------------------------------------------------------------------------------
def test_search_health_images_and_schema(client, photo):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["index"]["n_images"] == 40 and h["index"]["model"] == "fast"
    assert h["rerank"]["enabled"] is False and h["rerank"]["note"]
    assert h["write"]["enabled"] is False and h["load"]["capacity"] == 2 + 16

    r = client.get("/search", params={"q": "a dog runs on the grass", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "a dog runs on the grass" and body["k"] == 5 and body["rerank"] == 0
    hits = body["results"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(
        set(h) == {"rank", "row", "id", "url", "score", "taken", "folder", "camera", "kind"} for h in hits
    )
    assert all(h["kind"] == "image" for h in hits)
    assert hits[0]["score"] >= hits[-1]["score"]
    assert {"encode", "retrieve", "total", "queue", "server"} <= set(body["timings_ms"])
    # every result's image is served from the index, by id and by row
    img = client.get(hits[0]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content[:2] == b"\xff\xd8"
    rec, data = photo
    assert client.get(f"/images/{rec.id}").content == data
    assert client.get("/images/3").content == data
    # the page and its assets, no external references
    page = client.get("/")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    for asset in ("/static/app.js", "/static/app.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text
    assert "http" not in page.text.replace('href="/', "")
    schema = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/images/{image_id}", "/images", "/healthz"} <= set(schema["paths"])


BAD_SEARCHES = [
    ("q=", 400, "empty"),
    ("q=%20%20%09", 400, "empty"),
    ("q=" + "x" * 10_000, 400, "2000"),
    ("q=%FF%FE%FD", 400, "UTF-8"),
    ("q=a%00b", 400, "binary"),
    ("q=%ED%A0%80", 400, "UTF-8"),  # an encoded surrogate is not UTF-8
    ("k=5", 400, "missing"),
    ("q=dog&k=0", 400, "between"),
    ("q=dog&k=-3", 400, "between"),
    ("q=dog&k=99999999999999999999", 400, "between"),
    ("q=dog&k=ten", 400, "whole number"),
    ("q=dog&k=1.5", 400, "whole number"),
    ("q=dog&k=", 400, "whole number"),
    ("q=dog&rerank=-1", 400, "rerank"),
    ("q=dog&rerank=lots", 400, "rerank"),
    ("q=dog&rerank=5", 400, "re-ranking is not available"),
    ("q=dog&explain=1", 400, "rerank"),
    ("q=dog&explain=please", 400, "explain"),
    # only the schema's spellings (schemathesis checks that schema-violating requests are rejected)
    ("q=dog&k=%205%20", 400, "whole number"),
    ("q=dog&k=5_0", 400, "whole number"),
    ("q=dog&rerank=", 400, "rerank"),
    ("q=dog&why=yes", 400, "why"),
    ("q=dog&offset=+3", 400, "offset"),
]


@pytest.mark.parametrize("query,status,words", BAD_SEARCHES, ids=[b[0][:24] for b in BAD_SEARCHES])
def test_bad_text_queries_are_clear_4xx(client, query, status, words):
    body = check_error(client.get("/search?" + query), status)
    assert words.lower() in (body["error"] + str(body["detail"])).lower()


def test_bad_routes_and_no_path_traversal(client):
    for path in [
        "/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/../../etc/passwd",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
        "/images/99999",
        "/images/-1",
        "/images/" + "a" * 3000,
    ]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/json"
        assert "root:" not in r.text
    check_error(client.get("/nowhere"), 404)
    check_error(client.delete("/search"), 405)
    check_error(client.post("/images", files={"files": ("a.jpg", b"x")}), 403)
    assert client.get("/healthz").json()["status"] == "ok"


def test_image_search_and_bad_uploads(client, photo):
    rec, data = photo
    r = client.post("/search/image", params={"k": 4, "captions": 3}, files={"file": ("q.jpg", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"][0]["id"] == rec.id and len(body["images"]) == 4
    assert len(body["captions"]) == 3 and all(c["text"] and c["image_url"] for c in body["captions"])
    # not images, broken images, wrong k
    check_error(client.post("/search/image", files={"file": ("a.txt", b"hello world")}), 415)
    check_error(client.post("/search/image", files={"file": ("t.jpg", data[: len(data) // 3])}), 400)
    check_error(client.post("/search/image", files={"file": ("e.jpg", b"")}), 400)
    check_error(client.post("/search/image", files={"file": ("r.bin", os.urandom(5000))}), 415)
    check_error(client.post("/search/image", files={"nofile": ("q.jpg", data)}), 422)
    check_error(client.post("/search/image", content=b"raw bytes"), 422)
    broken = client.post(
        "/search/image",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    check_error(broken, 422)  # an unparsable multipart body: the upload field is missing
    check_error(client.post("/search/image?k=0", files={"file": ("q.jpg", data)}), 400)
    check_error(client.post("/search/image?captions=x", files={"file": ("q.jpg", data)}), 400)
    # a decompression bomb: a small PNG of 10000x5000 pixels
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10_000, 5_000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 1_000_000
    body = check_error(client.post("/search/image", files={"file": ("bomb.png", buf.getvalue())}), 400)
    assert "Mpx" in body["error"]
    assert client.get("/healthz").json()["status"] == "ok"


def _raw_request(server, head: bytes, body_part: bytes) -> bytes:
    """Send headers and only a part of the body; return what the server answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body_part)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_oversized_uploads_rejected_early_with_413(server, client):
    fifty_mb = 50 * 1024 * 1024
    head = (
        b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=zz\r\n"
        b"Content-Length: " + str(fifty_mb).encode() + b"\r\n\r\n"
    )
    t0 = time.perf_counter()
    answer = _raw_request(server, head, b"--zz\r\n" + b"x" * 100_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"upload too large' in answer
    assert time.perf_counter() - t0 < 5  # answered before the 50 MB were sent
    # without a Content-Length (chunked), the cap applies while the body streams in
    big = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="b.jpg"\r\n\r\n' + bytes(
        21 * 1024 * 1024
    )

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = client.post(
        "/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    check_error(r, 413)
    bad_length = b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n"
    assert _raw_request(server, bad_length, b"x").startswith(b"HTTP/1.1 400")
    # a 50 MB upload through an ordinary client gets the 413 too
    try:
        r = client.post("/search/image", files={"file": ("big.jpg", bytes(fifty_mb))})
        check_error(r, 413)
    except httpx.TransportError:
        pass  # the server may close the connection while the client is still sending: also a rejection
    assert client.get("/healthz").json()["status"] == "ok"


def test_rerank_and_explanations_with_the_slow_model(rerank_server):
    with rerank_server.client() as c:
        h = c.get("/healthz").json()
        assert h["rerank"] == {
            "enabled": True,
            "model": "slow",
            "note": None,
            "max": 200,
            "max_explained": 24,
            "unscored_results": 0,
        }
        r = c.get("/search", params={"q": "a dog in the snow", "k": 5, "rerank": 12, "explain": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rerank"] == 12 and len(body["results"]) == 5
        for hit in body["results"]:
            assert {"fast_score", "slow_score", "explanation"} <= set(hit)
            e = hit["explanation"]
            assert e["tokens"] == ["dog", "snow"] and e["grid"] == [14, 14]
            assert len(e["maps"]) == 2 and all(len(m) == 196 for m in e["maps"])
            assert all(abs(sum(m) - 1) < 0.01 for m in e["maps"])
        scores = [h["score"] for h in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert body["timings_ms"]["rerank"] > 0
        # the fused order differs from the Fast order only through the Slow scores
        fast_only = c.get("/search", params={"q": "a dog in the snow", "k": 12}).json()["results"]
        assert {h["id"] for h in body["results"]} <= {h["id"] for h in fast_only}
        # re-ranked without explanations: no maps in the answer
        r = c.get("/search", params={"q": "a dog", "k": 3, "rerank": 6})
        assert r.status_code == 200 and "explanation" not in r.json()["results"][0]
        check_error(c.get("/search", params={"q": "a dog", "rerank": 201}), 400)
        check_error(c.get("/search", params={"q": "a dog", "rerank": 5, "explain": "x"}), 400)


def test_add_images_with_write_token_and_refresh(index_dir, mini_flickr, tmp_path):
    from vlsearch.cli import main

    own = tmp_path / "idx"
    shutil.copytree(index_dir, own)
    s = start_server(own, write_token="s3cret-token")
    train = (mini_flickr / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()
    new = [(mini_flickr / "Flicker8k_Dataset" / n).read_bytes() for n in train[:3]]
    try:
        with s.client() as c:
            files = [("files", ("one.jpg", new[0])), ("files", ("two.jpg", new[1]))]
            check_error(c.post("/images", files=files), 401)
            check_error(c.post("/images", files=files, headers={"Authorization": "Bearer nope"}), 401)
            check_error(c.post("/images", files=files, headers={"Authorization": "s3cret-token"}), 401)
            auth = {"Authorization": "Bearer s3cret-token"}
            # one bad file: nothing is added
            bad = [*files, ("files", ("notes.txt", b"not an image"))]
            body = check_error(c.post("/images", files=bad, headers=auth), 415)
            assert body["detail"][0]["filename"] == "notes.txt"
            assert c.get("/healthz").json()["index"]["n_images"] == 40
            r = c.post("/images", files=files, headers=auth)
            assert r.status_code == 201, r.text
            out = r.json()
            assert out["added"] == 2 and out["n_images"] == 42
            assert [i["new"] for i in out["images"]] == [True, True]
            # stored durably beside the index under content-hash names
            stored = own.with_name("idx.uploads") / out["images"][0]["id"]
            assert stored.read_bytes() == new[0]
            assert stored.stem == hashlib.sha1(new[0]).hexdigest()
            assert c.get(out["images"][0]["url"]).content == new[0]
            hit = c.post("/search/image", params={"k": 1}, files={"file": ("q.jpg", new[1])}).json()
            assert hit["images"][0]["id"] == out["images"][1]["id"]
            # the same content again adds nothing
            again = c.post("/images", files=files[:1], headers=auth).json()
            assert again["added"] == 0 and again["images"][0]["new"] is False
            # another process adds images with `vlsearch index --add`: seen without a restart
            folder = tmp_path / "more"
            folder.mkdir()
            (folder / train[2]).write_bytes(new[2])
            assert main(["index", "--add", str(folder), "--out", str(own), "--quiet"]) == 0
            hit = c.post("/search/image", params={"k": 1}, files={"file": ("q.jpg", new[2])}).json()
            assert hit["images"][0]["id"] == train[2]
            h = c.get("/healthz").json()
            assert h["index"]["n_images"] == 43 and h["index"]["reloads"] >= 2 and h["write"]["enabled"]
    finally:
        s.stop()


def test_sheds_load_with_503_and_recovers(index_dir, photo):
    import asyncio

    _, data = photo
    s = start_server(index_dir, workers=1, max_queue=1)

    async def burst(n):
        async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=n)) as c:

            async def one(i):
                if i % 2:
                    return await c.post("/search/image", files={"file": ("q.jpg", data)})
                return await c.get("/search", params={"q": f"a dog number {i}", "k": 3})

            return await asyncio.gather(*(one(i) for i in range(n)))

    try:
        responses = asyncio.run(burst(40))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) > 0 and codes.count(200) >= 2
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]
        with s.client() as c:
            h = c.get("/healthz").json()
            assert h["load"]["in_flight"] == 0 and h["load"]["shed"] == codes.count(503)
            assert h["load"]["peak_in_flight"] <= 2
            assert c.get("/search", params={"q": "a dog", "k": 3}).status_code == 200
    finally:
        s.stop()


def test_model_pool_bounds_and_heavy_lane():
    """The admission counters: at most workers + max_queue admitted, heavy work at most workers +
    max_heavy_queue; full means Busy at once; slots come back when the work is done."""
    import asyncio

    from vlsearch.serve.app import Busy, ModelPool

    gate = threading.Event()

    async def scenario():
        pool = ModelPool(workers=1, threads_per_worker=1, max_queue=3, max_heavy_queue=1)
        held = [asyncio.ensure_future(pool.run(gate.wait, heavy=True)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await pool.run(gate.wait, heavy=True)  # heavy lane full (1 running + 1 waiting)
        held += [asyncio.ensure_future(pool.run(gate.wait)) for _ in range(2)]  # light work still admitted
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await pool.run(gate.wait)  # 4 admitted: full
        stats = pool.stats()
        assert stats["in_flight"] == 4 and stats["heavy_in_flight"] == 2 and stats["shed"] == 2
        gate.set()
        results = await asyncio.gather(*held)
        assert all(r[0] is True for r in results)
        assert pool.stats()["in_flight"] == 0 and pool.stats()["heavy_in_flight"] == 0
        assert (await pool.run(lambda: 7))[0] == 7
        pool.shutdown()

    asyncio.run(scenario())


def test_load_script_small_run(rerank_server):
    server = rerank_server
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "load_test.py"),
            "--url",
            server.url,
            "--clients",
            "4",
            "--requests",
            "80",
            "--rerank-requests",
            "12",
            "--rerank-k",
            "10",
            "--overload-clients",
            "16",
            "--overload-requests",
            "48",
            "--recovery-requests",
            "16",
            "--slow-clients",
            "200",
            "--slow-requests",
            "16",
            "--max-seconds",
            "60",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    phases = {p["phase"]: p for p in report["phases"]}
    assert set(phases) == {"fast", "rerank", "overload", "slow-baseline", "slow", "recovery"}
    slow = phases["slow"]
    assert slow["ok"] == 16 and slow["slow_sockets"]["opened"] == 200 and slow["p50_vs_without"] < 3
    rerank = phases["rerank"]
    assert rerank["ok"] == 12 and rerank["server_errors"] == rerank["lost"] == rerank["shed"] == 0
    fast = phases["fast"]
    assert fast["requests"] == 80 and fast["server_errors"] == 0 and fast["lost"] == 0
    assert fast["intended_4xx"] > 0 and fast["unexpected"] == 0 and fast["ok"] > 0
    assert phases["recovery"]["shed"] == 0 and phases["recovery"]["lost"] == 0
    assert fast["latency_ms"]["p50"] > 0
    # refuses anything but loopback
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load_test.py"), "--url", "http://example.com"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "loopback" in bad.stderr


# -- start-up errors of `vlsearch serve` ---------------------------------------------------------------------
def test_serve_startup_errors_exit_2(index_dir, tmp_path, capsys, tiny_fast_checkpoint):
    from safetensors.numpy import load_file, save_file

    from vlsearch.cli import main

    def serve(*args):
        code = main(["serve", "--port", "0", *args])
        return code, capsys.readouterr().err

    code, err = serve("--index", str(tmp_path / "missing"))
    assert code == 2 and "no index" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    (broken / "images.faiss").write_bytes(b"not faiss")
    code, err = serve("--index", str(broken))
    assert code == 2 and "corrupt" in err
    (broken / "config.json").write_text("{not json")
    code, err = serve("--index", str(broken))
    assert code == 2 and "corrupt" in err
    # a corrupt checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_fast_checkpoint, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    code, err = serve("--index", str(index_dir), "--model", str(ckpt))
    assert code == 2 and "unreadable" in err
    # an index made with another model (same type, other weights)
    weights = load_file(tiny_fast_checkpoint / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, ckpt / "model.safetensors")
    code, err = serve("--index", str(index_dir), "--model", str(ckpt))
    assert code == 2 and "was built with model" in err
    # a port in use
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code = main(["serve", "--index", str(index_dir), "--port", str(busy.getsockname()[1])])
        assert code == 2 and "cannot listen" in capsys.readouterr().err
    code, err = serve("--index", str(index_dir), "--port", "70000")
    assert code == 2
    # the real command in its own process: a message, exit 2, no traceback
    env = {**os.environ, "VLSEARCH_HOME": os.environ["VLSEARCH_HOME"]}
    proc = subprocess.run(
        [sys.executable, "-m", "vlsearch.cli", "serve", "--index", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "vlsearch serve: error: no index" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_command_runs_with_reranking_and_stops(index_dir, slow_checkpoint, tmp_path):
    """`vlsearch serve` as a user starts it: the Slow checkpoint exists, so re-ranking is on; it answers,
    re-ranks and explains, then stops on SIGINT."""
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlsearch.cli", "serve", "--index", str(index_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                r = httpx.get(base + "/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        assert r.json()["rerank"]["enabled"] is True and r.json()["rerank"]["model"] == "slow"
        r = httpx.get(base + "/search", params={"q": "two dogs", "k": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        q = {"q": "a dog on the beach", "k": 3, "rerank": 8, "explain": 1}
        r = httpx.get(base + "/search", params=q, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["explanation"]["tokens"] == ["dog", "beach"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "re-ranking on (slow)" in out and "stopped" in out


def test_rerank_off_without_a_slow_checkpoint(tmp_path, monkeypatch):
    import argparse

    from vlsearch.commands.serve import rerank_choice

    args = argparse.Namespace(no_rerank=False, rerank_model="slow")
    monkeypatch.setenv("VLSEARCH_HOME", str(tmp_path))
    model, note = rerank_choice(args)
    assert model is None and "vlsearch train slow" in note and str(tmp_path) in note
    args.no_rerank = True
    assert rerank_choice(args) == (None, "re-ranking was turned off with --no-rerank")
