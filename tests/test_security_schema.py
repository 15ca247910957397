"""The API contract, checked by schemathesis against the app's own schema: every check, 500+ generated
cases and a stateful phase over a real tiny model and index; zero failures means every status the
service answers and every parameter bound is in the schema, and every error body has one shape."""

from __future__ import annotations

import itertools

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.test_serve import build_test_index  # noqa: E402

CASES = 80  # per operation and mode: 4 operations with inputs x 2 modes, > 500 cases


@pytest.fixture(scope="module")
def app(tiny_fast_checkpoint, mini_flickr, tmp_path_factory):
    from vlsearch.search.engine import SearchEngine
    from vlsearch.serve.app import ServeSettings, create_app

    index = build_test_index(tmp_path_factory.mktemp("schema") / "idx", mini_flickr)
    engine = SearchEngine.open(index)
    app = create_app(engine, ServeSettings(rerank_note="no Slow model in this test", write_token="w" * 20))
    yield app
    app.state.service.pool.shutdown()


@pytest.fixture(scope="module")
def api_schema(app):
    # an upload can be schema-valid (any bytes) and still no image: 400 / 415 are its right answers
    upload = {"positive_data_acceptance": {"expected-statuses": [200, 201, 400, 401, 403, 413, 415]}}
    # a query of only whitespace or NUL is schema-valid (JSON Schema cannot say "not blank" in a way
    # every regex dialect agrees on) and answered 400
    text = {"positive_data_acceptance": {"expected-statuses": [200, 400]}}
    # negative cases are rejected too: the routes take integers and flags spelt only as the schema says
    ops = [{"include-path": p, "checks": upload} for p in ("/search/image", "/images")]
    config = schemathesis.Config.from_dict(
        {"operations": [*ops, {"include-path": "/search", "checks": text}]}
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def test_api_contract(api_schema):
    from hypothesis import given

    ran = {}
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for result, mode in itertools.product(list(api_schema.get_all_operations()), modes):
        op = result.ok()

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
        )
        def run(case):
            ran[case.operation.label] = ran.get(case.operation.label, 0) + 1
            case.call_and_validate()

        try:
            run()
        except Unsatisfiable:  # no invalid input exists (no parameters, or any string)
            assert mode == schemathesis.GenerationMode.NEGATIVE and op.label in (
                "GET /healthz",
                "GET /images/{image_id}",
                "DELETE /images/{image_id}",
            )
    assert len(ran) >= 5 and sum(ran.values()) >= 500, ran


def test_api_contract_stateful(api_schema):
    machine = api_schema.as_state_machine()
    machine.TestCase.settings = settings(
        max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), stateful_step_count=5
    )
    machine.TestCase().runTest()
