"""Error answers that no route gives, byte for byte: the body limit, unknown routes and methods.

They come from the middleware and Starlette's router, before any route or dependency runs, so
the app is used without its lifespan (no worker, no store); but a body streamed over the limit
is met only as a route reads it, after the route's token check.
"""

import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException

from service.http.app import create_app
from service.http.problems import install_handlers
from tests.conftest import settings_for_tests

PROBLEM = "application/problem+json"
LIMIT = 1024


@pytest.fixture(scope="module")
def bare() -> TestClient:
    """The app, its lifespan not started: only what answers before any route runs."""
    return TestClient(create_app(settings_for_tests(max_body_bytes=LIMIT)))


def expected_413() -> bytes:
    detail = f"the body is over SGD_MAX_BODY_BYTES={LIMIT} bytes; send less data per request"
    problem = {
        "type": "payload-too-large",
        "title": "Request body too large",
        "status": 413,
        "detail": detail,
    }
    return json.dumps(problem, separators=(",", ":")).encode()


def test_a_body_over_the_limit_by_content_length(bare: TestClient) -> None:
    r = bare.post("/fit", content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.content == expected_413()
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["content-length"] == str(len(expected_413()))
    assert r.headers["connection"] == "close"


def test_a_body_over_the_limit_while_it_streams() -> None:
    """The limit cuts a body off as it is read; POST /fit reads its body only after its token
    check, which needs the lifespan's state: this app is started."""

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"x" * (LIMIT // 2)

    with TestClient(create_app(settings_for_tests(max_body_bytes=LIMIT))) as started:
        r = started.post("/fit", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.content == expected_413()
    assert r.headers["content-length"] == str(len(expected_413()))
    assert r.headers["connection"] == "close"


def test_an_unknown_route(bare: TestClient) -> None:
    r = bare.get("/nowhere")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    assert r.json() == {
        "type": "not-found",
        "title": "Not found",
        "status": 404,
        "detail": "no route /nowhere; see /docs for the API",
    }


def test_a_method_the_route_does_not_take(bare: TestClient) -> None:
    r = bare.put("/predict")
    assert r.status_code == 405
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["allow"] == "GET, POST"
    assert r.json() == {
        "type": "method-not-allowed",
        "title": "Method not allowed",
        "status": 405,
        "detail": "PUT is not allowed on /predict; use GET, POST",
    }


def test_an_unknown_asset(bare: TestClient) -> None:
    r = bare.get("/static/nope.js")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    assert r.json() == {
        "type": "not-found",
        "title": "Not found",
        "status": 404,
        "detail": "no asset 'nope.js'; the page uses page.css, page.js",
    }


def test_an_http_error_of_a_status_the_service_does_not_name() -> None:
    app = FastAPI()
    install_handlers(app)

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(418, "short and stout", headers={"X-Tea": "earl grey"})

    r = TestClient(app).get("/teapot")
    assert r.status_code == 418
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["x-tea"] == "earl grey"
    assert r.json() == {
        "type": "http-error",
        "title": "HTTP error",
        "status": 418,
        "detail": "short and stout",
    }
