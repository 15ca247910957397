"""Filters, sort, paging and compound queries through the service (real uvicorn, httpx) and the page
(real Chromium): only matching images, pages without gaps or repeats, dates and folders on the cards,
more results loaded on scroll."""

from __future__ import annotations

import pytest

from tests.test_browser import browser, page, until  # noqa: F401 - fixtures
from tests.test_photos import build_photo_index, day
from tests.test_serve import start_server

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(tiny_fast_checkpoint, tmp_path_factory):
    s = start_server(build_photo_index(tmp_path_factory.mktemp("photos-serve")))
    yield s
    s.stop()


def test_search_filters_and_cursor_paging(server):
    with server.client() as c:
        whole = c.get(
            "/search", params={"q": "people", "k": 25, "after": "2021-01-02", "before": "2021"}
        ).json()
        assert whole["n_matching"] == 23 and len(whole["results"]) == 23
        assert all(r["taken"] >= day(2) and r["folder"] in ("trip/day1", "home") for r in whole["results"])
        rows, cursor = [], None
        while True:
            params = {
                "q": "people",
                "k": 6,
                "after": "2021-01-02",
                "before": "2021",
                **({"cursor": cursor} if cursor else {}),
            }
            body = c.get("/search", params=params).json()
            rows += [r["row"] for r in body["results"]]
            assert [r["rank"] for r in body["results"]] == list(
                range(body["offset"] + 1, body["offset"] + 1 + len(body["results"]))
            )
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert rows == [r["row"] for r in whole["results"]]
        dated = c.get("/search", params={"q": "people", "k": 10, "sort": "date", "camera": "canon"}).json()
        taken = [r["taken"] for r in dated["results"]]
        assert taken == sorted(taken, reverse=True) and all(
            r["camera"] == "Canon EOS 5D" for r in dated["results"]
        )
        near = c.get("/search", params={"q": "people", "near": "48.85,2.35,25", "k": 25}).json()
        assert len(near["results"]) == 4
        minus = c.get("/search", params={"q": "people -food", "k": 5, "min_score": "-1"}).json()
        assert len(minus["results"]) == 5
        for bad in (
            {"after": "soon"},
            {"near": "1,2"},
            {"sort": "size"},
            {"cursor": "zzz"},
            {"min_score": "x"},
            {"offset": "-3"},
        ):
            r = c.get("/search", params={"q": "people", **bad})
            assert r.status_code == 400, (bad, r.text)
        assert c.get("/healthz").status_code == 200


def test_page_filters_dates_and_infinite_scroll(page, server):  # noqa: F811 - fixture
    searches = []
    page.on("request", lambda r: searches.append(r.url) if "/search?" in r.url else None)
    page.goto(server.url + "/")
    page.fill("#q", "people outside")
    page.press("#q", "Enter")
    # the first page holds 24; the page may fetch the second at once while the thumbnails are still
    # unloaded (a short grid leaves the end in view), so wait for "at least", not "exactly"
    until(page, "() => document.querySelectorAll('#grid .card').length >= 24")
    meta = page.inner_text("#grid .card .meta")
    assert meta[:4] in ("2021", "2026") and ("trip/day1" in meta or "home" in meta)
    page.mouse.wheel(0, 20000)  # the 25th image arrives as the second page
    until(page, "() => document.querySelectorAll('#grid .card').length === 25")
    assert "cursor=" not in searches[0] and "k=24" in searches[0]
    assert any("cursor=" in u for u in searches[1:]), searches
    ranks = page.eval_on_selector_all("#grid .card .rank", "els => els.map(e => +e.textContent)")
    assert ranks == list(range(1, 26))
    page.fill("#f-folder", "home")
    page.select_option("#f-sort", "date")  # a change re-runs the search with the filters
    until(page, "() => document.querySelectorAll('#grid .card').length === 13")
    metas = page.eval_on_selector_all("#grid .card .meta", "els => els.map(e => e.textContent)")
    assert all(m.endswith("home") for m in metas)
    dates = [m[:10] for m in metas]
    assert dates == sorted(dates, reverse=True)
    assert "folder=home" in page.url and "sort=date" in page.url
    assert not page.errors and not page.outside
