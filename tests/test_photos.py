"""Photos as cameras write them, on real files made from the shared COCO photos inside the tests:
EXIF orientation, HEIC, alpha, draft decoding and the cache key; metadata; filters that run inside
retrieval; date sort; paging without gaps or repeats; compound queries."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COCO, need_data
from vlsearch.models.fast import has_prior_column

TAKEN = "2021-{m:02d}-{d:02d} 10:00:00"


def coco_photos(n: int) -> list[Path]:
    need_data()
    files = sorted((COCO / "train2017").glob("*.jpg"))
    if len(files) < n:
        pytest.skip(f"needs {n} COCO photos")
    return files[:n]


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def exif(i: int, gps: tuple[float, float] | None = None, orientation: int | None = None) -> Image.Exif:
    ex = Image.Exif()
    ex[271], ex[272] = ("Canon", "Canon EOS 5D") if i % 2 else ("Apple", "iPhone 13")
    ex.get_ifd(0x8769)[36867] = f"2021:{1 + i // 28:02d}:{1 + i % 28:02d} 10:00:00"
    if gps:
        lat, lon = gps
        ex.get_ifd(0x8825).update(
            {
                1: "N" if lat >= 0 else "S",
                2: (abs(lat), 0.0, 0.0),
                3: "E" if lon >= 0 else "W",
                4: (abs(lon), 0.0, 0.0),
            }
        )
    if orientation:
        ex[0x0112] = orientation
    return ex


@pytest.fixture(scope="module")
def embedder(tiny_fast_checkpoint):
    from vlsearch.models.registry import load_model
    from vlsearch.search.embedder import Embedder

    net, _, _ = load_model("fast")
    return Embedder(net, progress=False)


# -- decoding -------------------------------------------------------------------------------------------
def test_orientation_6_embeds_like_its_upright_copy(tmp_path, embedder):
    from vlsearch.encoders.features import file_key, photo_key

    src = Image.open(coco_photos(1)[0]).convert("RGB")
    upright = tmp_path / "upright.jpg"
    src.save(upright, quality=95)
    stored = src.transpose(Image.Transpose.ROTATE_90)  # as a phone held sideways stores it
    sideways = tmp_path / "sideways.jpg"
    stored.save(sideways, quality=95, exif=exif(0, orientation=6))
    ignored = tmp_path / "no-exif.jpg"  # the same pixels without the tag: what ignoring EXIF sees
    stored.save(ignored, quality=95)
    emb, keys = embedder.embed_paths([upright, sideways, ignored])
    assert None not in keys
    assert cos(emb[0], emb[1]) >= 0.99
    assert cos(emb[0], emb[2]) < cos(emb[0], emb[1]) - 0.01
    # the rotated file gets its own cache key (old caches held its unrotated features); others do not
    assert photo_key(sideways, 224) != file_key(sideways)
    assert photo_key(upright, 224) == file_key(upright)
    # query images and thumbnails-to-be go through the same decode
    assert cos(embedder.embed_image(sideways), emb[0]) >= 0.99


def test_flickr_photos_keep_their_cache_keys():
    from tests.conftest import FLICKR
    from vlsearch.encoders.features import file_key, photo_key

    need_data()
    files = sorted((FLICKR / "Flicker8k_Dataset").glob("*.jpg"))[:200]
    assert files
    assert all(photo_key(p, 224) == file_key(p) for p in files)


def test_heic_decodes_and_embeds(tmp_path, embedder):
    pytest.importorskip("pillow_heif")
    from vlsearch.data import load_folder
    from vlsearch.data.images import load_image

    src = Image.open(coco_photos(2)[1]).convert("RGB")
    jpg, heic = tmp_path / "a.jpg", tmp_path / "b.heic"
    src.save(jpg, quality=95)
    src.save(heic, format="HEIF", quality=90)
    assert Image.open(heic).format == "HEIF"
    assert load_image(heic).shape == (224, 224, 3)
    emb, keys = embedder.embed_paths([jpg, heic])
    assert None not in keys and cos(emb[0], emb[1]) >= 0.97
    assert {p.name for p in load_folder(tmp_path).image_paths} == {"a.jpg", "b.heic"}
    from vlsearch.data.photo import display_jpeg  # what the service sends the page for a HEIC file

    shown = Image.open(__import__("io").BytesIO(display_jpeg(heic)))
    assert shown.format == "JPEG" and shown.size == src.size


def test_alpha_is_composited_on_white_and_other_formats_read(tmp_path):
    from vlsearch.data.images import load_image

    rgba = Image.new("RGBA", (300, 200), (200, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 150, 200))
    rgba.save(tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png")
    assert arr[100, 200].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert arr[100, 20, 1] > 150
    src = Image.open(coco_photos(1)[0]).convert("RGB")
    for ext in ("tif", "webp"):
        src.save(tmp_path / f"x.{ext}")
        assert load_image(tmp_path / f"x.{ext}").shape == (224, 224, 3)


def test_draft_decode_of_a_12_megapixel_photo_embeds_like_a_full_decode(tmp_path, embedder):
    from vlsearch.data.images import load_image

    big = tmp_path / "big.jpg"
    Image.open(coco_photos(1)[0]).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(big, quality=90)
    with Image.open(big) as img:
        img.draft("RGB", (448, 448))
        assert img.size[0] < 4000  # the decoder really shrinks in the DCT domain
    fast, full = load_image(big), load_image(big, draft=False)
    assert fast.shape == full.shape == (224, 224, 3)
    a = embedder.extractor.encode_image_arrays([fast, full])
    e = embedder._image(a["grid"], a["mid"])
    assert cos(e[0], e[1]) >= 0.99
    # its features are keyed apart from those of earlier decodes of the same file (plain, or draft v1)
    from vlsearch.data.photo import DRAFT_VARIANT, decode_variant
    from vlsearch.encoders.features import file_key, photo_key

    with Image.open(big) as img:
        assert decode_variant(img, 224) == DRAFT_VARIANT
    assert photo_key(big, 224) != file_key(big)


def test_hidden_files_os_metadata_and_exclude_are_skipped(tmp_path):
    from vlsearch.data import load_folder

    img = Image.new("RGB", (32, 32))
    for rel in (
        "a.jpg",
        "keep/b.jpg",
        "raw/c.jpg",
        ".hidden/d.jpg",
        "@eaDir/e.jpg",
        "._f.jpg",
        "x/.g.jpg",
        "h.tmp.jpg",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / rel, format="JPEG")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    ids = load_folder(tmp_path, exclude=["raw", "*.tmp.jpg"]).image_ids
    assert sorted(ids) == ["a.jpg", "keep/b.jpg"]


# -- metadata, filters, sort, paging -------------------------------------------------------------------
PARIS, NYC = (48.85, 2.35), (40.71, -74.0)


def build_photo_index(base: Path) -> Path:
    """24 real photos with distinct EXIF dates (Jan 1..24 2021), two cameras, GPS on a third of them,
    in two folders, plus one without EXIF (its date is the file's mtime): an index over them."""
    from vlsearch.index.build import build_index

    root = base / "album"
    for i, src in enumerate(coco_photos(25)):
        folder = root / ("trip/day1" if i < 12 else "home")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.open(src).convert("RGB")
        if i == 24:
            img.save(folder / f"p{i:02d}.jpg")
            continue
        gps = (PARIS if i % 2 else NYC) if i % 3 == 0 else None
        img.save(folder / f"p{i:02d}.jpg", exif=exif(i, gps), quality=90)
    out = base / "idx"
    build_index(out, root, progress=False)
    return out


@pytest.fixture(scope="module")
def gallery(tiny_fast_checkpoint, tmp_path_factory):
    from vlsearch.search.engine import SearchEngine

    return SearchEngine.open(build_photo_index(tmp_path_factory.mktemp("photos")))


def day(d: int) -> float:
    from datetime import UTC, datetime

    return datetime(2021, 1, d, 10, tzinfo=UTC).timestamp()


def test_metadata_is_stored(gallery):
    metas = gallery.index.photos(range(25))
    by_name = {Path(r.path).name: metas[row] for row, r in enumerate(gallery.index.records(range(25)))}
    m = by_name["p03.jpg"]
    assert m.taken == day(4) and m.taken_source == "exif"
    assert m.camera == "Canon EOS 5D" and m.folder == "trip/day1"
    assert m.lat == pytest.approx(48.85) and m.lon == pytest.approx(2.35)
    assert m.width and m.height and m.bytes > 1000
    assert by_name["p01.jpg"].lat is None
    assert by_name["p24.jpg"].taken_source == "mtime" and abs(by_name["p24.jpg"].taken - time.time()) < 3600


def test_filters_return_only_matches_and_k_of_them(gallery):
    r = gallery.search("a photo", k=5, after="2021-01-03", before="2021-01-09")  # Jan 3..9: 7 images
    assert len(r.hits) == 5 and r.n_matching == 7
    assert all(day(3) <= h.taken <= day(9) for h in r.hits)
    r = gallery.search("a photo", k=10, camera="iphone")
    assert len(r.hits) == 10 and all(h.camera == "Apple iPhone 13" for h in r.hits)
    r = gallery.search("a photo", k=20, folder="trip")
    assert len(r.hits) == 12 and all(h.folder == "trip/day1" for h in r.hits)
    assert len(gallery.search("a photo", k=20, folder="tri").hits) == 0  # a folder, not a string prefix
    r = gallery.search("a photo", k=20, near="48.85,2.35,50")
    names = {Path(h.path).name for h in r.hits}
    assert names == {f"p{i:02d}.jpg" for i in (3, 9, 15, 21)}
    # a filter matching images Fast ranks last still returns them: filtering runs inside retrieval
    worst = gallery.search("a photo", k=25).hits[-3:]
    days = sorted(round((h.taken - day(1)) / 86400) + 1 for h in worst if h.taken < day(25))
    r = gallery.search("a photo", k=3, after=f"2021-01-{days[0]:02d}", before=f"2021-01-{days[0]:02d}")
    assert len(r.hits) == 1 and r.n_matching == 1


def test_paging_has_no_gaps_or_repeats(gallery):
    whole = [h.row for h in gallery.search("people outside", k=25).hits]
    for f in ({"after": "2021-01-05"}, {"camera": "canon", "sort": "date"}):
        ref = [h.row for h in gallery.search("people outside", k=25, **f).hits]
        pages, offset = [], 0
        while offset is not None:
            r = gallery.search("people outside", k=5, offset=offset, **f)
            pages += [h.row for h in r.hits]
            offset = r.next_offset
        assert pages == ref, f
        by_cursor, cursor = [], None
        while True:
            r = gallery.search("people outside", k=7, cursor=cursor, **f)
            by_cursor += [h.row for h in r.hits]
            if r.next_cursor is None:
                break
            cursor = r.next_cursor
        assert by_cursor == ref and len(set(ref)) == len(ref)
    assert sorted(whole) == list(range(25))


def test_date_sort_min_score_and_bad_values(gallery):
    from vlsearch.errors import QueryError

    hits = gallery.search("a dog", k=25, sort="date").hits
    taken = [h.taken for h in hits]
    assert taken == sorted(taken, reverse=True)
    scores = [h.score for h in gallery.search("a dog", k=25).hits]
    cut = scores[10]
    kept = gallery.search("a dog", k=25, min_score=cut).hits
    assert len(kept) >= 11 and all(h.score >= cut for h in kept)
    for bad in ({"after": "yesterday"}, {"near": "1,2"}, {"sort": "size"}, {"min_score": 3}, {"offset": -1}):
        with pytest.raises(QueryError):
            gallery.search("a dog", **bad)
    r = gallery.search("a dog", k=3)
    with pytest.raises(QueryError):
        gallery.search("a cat", k=3, cursor=r.next_cursor)  # another query's cursor
    with pytest.raises(QueryError):
        gallery.search("a dog", k=3, cursor="garbage")


def test_index_without_photo_metadata_still_opens_and_filters(gallery, tmp_path):
    from vlsearch.index.build import add_to_index
    from vlsearch.index.gallery import read_records, write_gallery
    from vlsearch.search.engine import SearchEngine

    old = tmp_path / "old"
    idx = gallery.index
    write_gallery(
        old, idx.config, read_records(idx), np.asarray(idx.embeddings, np.float32)
    )  # no photos table
    engine = SearchEngine.open(old)
    assert len(engine.search("a dog", k=5).hits) == 5
    assert engine.search("a dog", k=5, after="2021").hits == []  # no dates known
    assert len(engine.search("a dog", k=30, folder="home").hits) == 13
    extra = tmp_path / "extra.jpg"
    Image.open(coco_photos(26)[25]).convert("RGB").save(extra, exif=exif(30))
    assert add_to_index(old, [extra], progress=False)[0] == 1  # the add fills in everyone's metadata
    engine.refresh()
    assert len(engine.search("a dog", k=30, after="2021-01-01", before="2021-02").hits) == 25


def test_filtered_search_matches_brute_force_on_every_index_kind(monkeypatch):
    from vlsearch.index import photos as P
    from vlsearch.index.vectors import make_vector_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[7] + 0.1 * rng.standard_normal(32).astype(np.float32)
    allowed = np.sort(rng.choice(3000, 60, replace=False))
    truth = allowed[np.argsort(-(x[allowed] @ q))[:10]]
    for exact in (True, False):
        monkeypatch.setattr(P, "EXACT_SUBSET", 10**9 if exact else 0)
        for kind in ("flat", "hnsw", "ivfflat"):  # ivfflat: the over-fetching path (as IVF-PQ takes)
            vi = make_vector_index(32, 3000, kind)
            vi.add(x)
            vi.attach_vectors(x.astype(np.float16))
            scores, rows = P.search_filtered(vi, x.astype(np.float16), q, 10, allowed)
            assert set(rows) <= set(allowed) and len(rows) == 10, kind
            overlap = len(set(rows) & set(truth)) / 10
            assert overlap >= (1.0 if exact or kind == "flat" else 0.8), (kind, exact, overlap)


# -- compound queries ----------------------------------------------------------------------------------
def test_compound_queries_parse():
    from vlsearch.errors import QueryError
    from vlsearch.search.queries import parse_query

    t = parse_query("beach -people")
    assert [(x.weight, x.text) for x in t] == [(1.0, "beach"), (-1.0, "people")]
    t = parse_query("2:dog 1:snow")
    assert [(x.weight, x.text) for x in t] == [(2.0, "dog"), (1.0, "snow")]
    t = parse_query("a dog on grass -snow storm +0.5:red ball")
    assert [(x.weight, x.text) for x in t] == [
        (1.0, "a dog on grass"),
        (-1.0, "snow storm"),
        (0.5, "red ball"),
    ]
    assert [(x.weight, x.text) for x in parse_query("a t-shirt 10:30")] == [(1.0, "a t-shirt"), (10.0, "30")]
    with pytest.raises(QueryError):
        parse_query("-people")


def test_compound_queries_move_results_the_way_their_terms_say(gallery):
    emb = gallery.embedder
    img = np.asarray(gallery.index.embeddings, np.float32)

    def mean_sim(hits, term):
        t = emb.embed_query(term)
        return float(np.mean([img[h.row] @ t for h in hits]))

    plain = gallery.search("people", k=5).hits
    minus = gallery.search("people -food", k=5).hits
    assert mean_sim(minus, "food") < mean_sim(plain, "food")
    dog = gallery.search("3:dog 1:food", k=5).hits
    food = gallery.search("1:dog 3:food", k=5).hits
    assert mean_sim(food, "food") > mean_sim(dog, "food")
    assert mean_sim(dog, "dog") > mean_sim(food, "dog")
    # a compound query's vector is the renormalised weighted sum of its terms' vectors
    v = gallery.embed_terms(__import__("vlsearch.search.queries", fromlist=["x"]).parse_query("2:dog 1:snow"))
    ref = 2 * emb.embed_query("dog") + emb.embed_query("snow")
    if has_prior_column(emb.model):  # the hubness prior's column stays 1 (models/hubness.py)
        assert v[-1] == 1
        v, ref = v[:-1], ref[:-1]
    assert cos(v, ref) > 0.9999
