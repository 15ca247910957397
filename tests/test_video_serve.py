"""Videos through the service (kind/t_start/t_end in results, GET /videos/{id} with HTTP ranges and frame
thumbnails) and in the page, in the real browser: a video result plays from its moment."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from tests.conftest import link_photo
from tests.test_browser import browser, until  # noqa: F401, F811 - browser is a fixture
from tests.test_serve import start_server
from tests.test_video import photos


@pytest.fixture(scope="module")
def video_index(tiny_fast_checkpoint, tmp_path_factory):
    """2 photos and 2 slideshows (an mp4 and a webm), indexed."""
    from vlsearch.bench.slideshow import write_slideshow
    from vlsearch.index.build import build_index

    folder = tmp_path_factory.mktemp("vserve") / "media"
    folder.mkdir()
    for p in photos(2, 50):
        link_photo(p, folder / p.name)
    spans = {
        "show.mp4": write_slideshow(photos(3, 60), folder / "show.mp4", holds=[3.0, 3.0, 3.0]),
        "show.webm": write_slideshow(photos(3, 63), folder / "show.webm", holds=[3.0, 3.0, 3.0]),
    }
    path, _ = build_index(folder.parent / "idx", folder, progress=False)
    return path, spans


@pytest.fixture(scope="module")
def server(video_index):
    s = start_server(video_index[0])
    yield s
    s.stop()


def test_search_results_carry_the_moment(server):
    r = httpx.get(server.url + "/search", params={"q": "a dog runs", "k": 10}, timeout=60)
    assert r.status_code == 200
    results = r.json()["results"]
    videos = [x for x in results if x["kind"] == "video"]
    assert {v["id"] for v in videos} == {"show.mp4", "show.webm"}
    assert sum(x["kind"] == "image" for x in results) == 2
    for v in videos:
        assert 0 <= v["t_start"] <= v["t_frame"] < v["t_end"] <= 9.5
        assert v["video_url"] == "/videos/" + v["id"] and v["url"].startswith(v["video_url"] + "?frame=")


def test_video_file_with_range_requests_and_thumbnails(server, video_index):
    from PIL import Image

    path, _ = video_index
    whole = httpx.get(server.url + "/videos/show.mp4", timeout=30)
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers.get("accept-ranges") == "bytes"
    part = httpx.get(server.url + "/videos/show.mp4", headers={"Range": "bytes=100-1099"}, timeout=30)
    assert part.status_code == 206 and part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole.content)}"
    tail = httpx.get(server.url + "/videos/show.webm", headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.status_code == 206 and len(tail.content) == 10
    thumb = httpx.get(server.url + "/videos/show.mp4", params={"frame": "4.5"}, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (320, 240)
    for params, status in (({"frame": "abc"}, 400), ({"frame": "99"}, 400)):
        r = httpx.get(server.url + "/videos/show.mp4", params=params, timeout=30)
        assert r.status_code == status and "frame" in r.json()["error"]
    r = httpx.get(server.url + "/videos/nope.mp4", timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "no such video in the index"


def test_page_plays_the_clip_from_its_moment(browser, server):  # noqa: F811
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.fill("#q", "a dog runs")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid .card.video .moment")
    assert page.locator("#grid .card.video").count() == 2
    badge = page.inner_text("#grid .card.video .moment >> nth=0")
    assert "0:0" in badge and "-" in badge
    # the thumbnail is the moment's frame, decoded by the server
    until(
        page,
        "() => [...document.querySelectorAll('#grid .card.video img')].every(i => i.complete && i.naturalWidth > 0)",
    )
    webm = page.locator("#grid .card.video", has=page.locator("img[alt='show.webm']"))
    webm.click()
    page.wait_for_selector("#viewer[open] #viewer-video:not([hidden])")
    assert page.is_hidden("#viewer-img")
    start = float(page.get_attribute("#viewer-video", "data-start"))
    # the clip loads (ranges served by /videos) and starts at the moment, not at 0
    until(page, "() => document.getElementById('viewer-video').readyState >= 1", timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline:
        t = page.evaluate("() => document.getElementById('viewer-video').currentTime")
        if abs(t - start) < 1.0 and (start == 0 or t > 0):
            break
        time.sleep(0.1)
    assert abs(t - start) < 1.0, (t, start)
    assert "@" in page.inner_text("#viewer-title")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    # a moment well into the clip: the viewer seeks there (the page's own openViewer, a real hit)
    page.evaluate(
        "() => openViewer({...state.results.find(r => r.id === 'show.webm'), t_start: 6.0, t_end: 9.0})"
    )
    page.wait_for_selector("#viewer[open] #viewer-video:not([hidden])")
    until(page, "() => Math.abs(document.getElementById('viewer-video').currentTime - 6.0) < 0.5", timeout=30)
    assert "0:06-0:09" in page.inner_text("#viewer-title")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    assert page.is_hidden("#viewer-video")
    # a photo result still opens as a photo
    page.locator("#grid .card:not(.video)").first.click()
    page.wait_for_selector("#viewer[open] #viewer-img:not([hidden])")
    assert page.is_hidden("#viewer-video")
    assert not errors, errors
