"""The hubness prior (models/hubness.py): its column, its arithmetic, and every path that meets it."""

import faiss
import numpy as np
import pytest
import torch

from vlsearch.index.vectors import FlatIndex, IVFPQIndex
from vlsearch.models.checkpoint import load_checkpoint, save_checkpoint
from vlsearch.models.fast import FastConfig, FastModel, has_prior_column, set_hubness
from vlsearch.models.hubness import HubnessPrior, combine_query_vectors, zero_prior_column


def _model_with_bank(bank_size=16, weight=1.0, seed=0) -> FastModel:
    torch.manual_seed(seed)
    cfg = FastConfig(hubness_bank=bank_size, hubness_weight=weight, hubness_temperature=0.05)
    model = FastModel(cfg, init_from_pretrained=False).eval()
    bank = torch.nn.functional.normalize(torch.randn(bank_size, cfg.embed_dim), dim=-1)
    model.hubness.set_bank(bank, None)
    return model


def _inputs(n_images=6, n_texts=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, 49, 1280, generator=g), torch.randn(n_texts, 7, 384, generator=g)


@torch.no_grad()
def test_vectors_carry_the_prior_column_and_score_the_corrected_cosine():
    model = _model_with_bank(weight=0.75)
    grid, states = _inputs()
    lengths = torch.tensor([7, 5, 3, 7, 2])
    img, txt = model.encode_image(grid), model.encode_text(states, lengths)
    assert img.shape[1] == txt.shape[1] == model.embed_dim == model.config.embed_dim + 1
    assert torch.all(txt[:, -1] == 1)
    set_hubness(model, False)
    plain_img, plain_txt = model.encode_image(grid), model.encode_text(states, lengths)
    assert plain_img.shape[1] == model.config.embed_dim and not has_prior_column(model)
    prior = HubnessPrior.log_prior(plain_img, model.hubness_bank(), 0.05)
    want = plain_txt @ plain_img.T - 0.75 * (prior - model.config.hubness_offset)[None, :]
    torch.testing.assert_close(txt @ img.T, want, atol=1e-5, rtol=1e-5)
    # image-to-text ranking is untouched: the prior is a constant per image
    assert torch.equal((txt @ img.T).argsort(0), (plain_txt @ plain_img.T).argsort(0))


@torch.no_grad()
def test_a_hub_image_is_demoted():
    """An image near every bank caption loses to one that matches the query as well but is near none."""
    model = _model_with_bank(bank_size=8, weight=1.0)
    d = model.config.embed_dim
    query = torch.nn.functional.normalize(torch.randn(1, d), dim=-1)
    hub_dir = torch.nn.functional.normalize(torch.randn(1, d), dim=-1)
    model.hubness.set_bank(torch.nn.functional.normalize(hub_dir + 0.3 * torch.randn(8, d), dim=-1), None)
    hub = torch.nn.functional.normalize(query + hub_dir, dim=-1)
    plain = torch.nn.functional.normalize(
        query + torch.nn.functional.normalize(torch.randn(1, d), dim=-1), dim=-1
    )
    images = model.with_image_prior(torch.cat([hub, plain]))
    q = torch.cat([query, torch.ones(1, 1)], -1)
    raw = (query @ torch.cat([hub, plain]).T)[0]
    corrected = (q @ images.T)[0]
    assert raw[0] > raw[1] - 0.05  # about as good a match, by cosine
    assert corrected[1] > corrected[0]  # the hub goes below


def test_image_queries_and_compound_queries_keep_the_column_right():
    v = np.array([0.6, 0.8, -0.3], np.float32)  # two embedding dims + the prior column
    np.testing.assert_array_equal(zero_prior_column(v, True), np.array([0.6, 0.8, 0.0], np.float32))
    assert v[-1] == np.float32(-0.3)  # the input is not modified
    assert zero_prior_column(v, False) is v
    terms = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)
    q, norm = combine_query_vectors(terms, [1.0, -0.5], True)
    np.testing.assert_allclose(q, [1 / np.sqrt(1.25), -0.5 / np.sqrt(1.25), 1.0], rtol=1e-6)
    assert norm == pytest.approx(np.sqrt(1.25))
    _, norm = combine_query_vectors(np.array([[1.0, 0.0, 1.0]] * 2, np.float32), [1.0, -1.0], True)
    assert norm < 1e-6  # terms that cancel are caught on the embedding part, not rescued by the column


def test_checkpoint_round_trip_keeps_the_bank(tmp_path):
    model = _model_with_bank(weight=0.5)
    model.config.hubness_offset = 0.123
    path = save_checkpoint(tmp_path / "fast-h", model, {})
    loaded, _ = load_checkpoint(path, FastModel)
    assert loaded.config.hubness_bank == 16 and loaded.config.hubness_offset == pytest.approx(0.123)
    torch.testing.assert_close(loaded.hubness.bank_fast, model.hubness.bank_fast)
    grid, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(grid), model.encode_image(grid))


def test_ivfpq_takes_a_width_its_subquantisers_do_not_divide():
    """640 + the prior column is 641, a prime: faiss pads it, so the codes keep 32 sub-quantisers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 641)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pq, flat = IVFPQIndex.create(641, len(x)), FlatIndex.create(641)
    pq.add(x)
    flat.add(x)
    assert pq.dim == 641 and faiss.downcast_index(faiss.extract_index_ivf(pq.index)).pq.M == 32
    queries = x[:20] + 0.05 * rng.standard_normal((20, 641)).astype(np.float32)
    assert (pq.search(queries, 1)[1] == flat.search(queries, 1)[1]).mean() >= 0.9


def test_an_index_searches_the_corrected_score(tiny_fast_checkpoint, mini_flickr, tmp_path):
    """The conftest Fast model, with its prior on: text hits score q . x + the image's column, an image
    used as a query scores itself at cosine 1 (its column zeroed), and a compound query keeps a column of
    1."""
    from vlsearch.index.build import build_index
    from vlsearch.models.registry import load_model
    from vlsearch.search.engine import SearchEngine
    from vlsearch.search.queries import parse_query

    net = load_model(tiny_fast_checkpoint)[0]
    if not has_prior_column(net):  # dev of the 40-image split chose w = 0: give it one
        net.config.hubness_weight = 0.5
        tiny_fast_checkpoint = save_checkpoint(tmp_path / "fast-h", net, {})
    build_index(tmp_path / "idx", mini_flickr, model=str(tiny_fast_checkpoint), kind="flat", progress=False)
    engine = SearchEngine.open(tmp_path / "idx")
    assert engine.index.config.dim == net.embed_dim == 641
    vectors = engine.index.images.reconstruct_all()
    assert np.ptp(vectors[:, -1]) > 0  # a prior per image, not a constant
    q = engine.embedder.embed_query("a dog runs through the grass")
    assert q[-1] == 1
    hits = engine.search("a dog runs through the grass", k=5).hits
    want = vectors @ q
    assert [h.row for h in hits] == list(np.argsort(-want, kind="stable")[:5])
    assert hits[0].score == pytest.approx(float(want.max()), abs=1e-4)
    by_image = engine.search_image(hits[0].path, k=1).hits[0]
    assert by_image.row == hits[0].row and by_image.score == pytest.approx(1.0, abs=2e-3)
    compound = engine.embed_terms(parse_query("dog -grass"))
    assert compound[-1] == 1 and np.linalg.norm(compound[:-1]) == pytest.approx(1.0, abs=1e-5)
    # --no-hubness: recorded in the index, the vectors and the queries lose the column
    build_index(
        tmp_path / "plain",
        mini_flickr,
        model=str(tiny_fast_checkpoint),
        kind="flat",
        progress=False,
        hubness=False,
    )
    plain = SearchEngine.open(tmp_path / "plain")
    assert plain.index.config.hubness is False and plain.index.config.dim == 640
    assert plain.embedder.embed_query("a dog").shape == (640,)
    np.testing.assert_allclose(plain.index.images.reconstruct_all(), vectors[:, :-1], atol=2e-3)
    assert len(plain.search("a dog runs through the grass", k=5).hits) == 5


@torch.no_grad()
def test_the_fused_bank_is_kept_and_follows_new_contents():
    """The fp32 bank is built once per setting, and rebuilt when the buffers change under it."""
    model = _model_with_bank(weight=1.0)
    first = model.hubness_bank()
    assert model.hubness_bank() is first  # kept between calls
    grid, _ = _inputs()
    before = model.encode_image(grid)
    new = torch.nn.functional.normalize(torch.randn_like(model.hubness.bank_fast.float()), dim=-1)
    model.load_state_dict({**model.state_dict(), "hubness.bank_fast": new.half()})
    assert model.hubness_bank() is not first
    torch.testing.assert_close(model.hubness_bank(), new.half().float())
    assert not torch.allclose(model.encode_image(grid)[:, -1], before[:, -1])
