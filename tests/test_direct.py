"""The plain-ASGI /predict answers exactly what the FastAPI route answers, or leaves it to it."""

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service.http.deps import get_store
from service.state.base import Store
from tests.conftest import TUTORIAL, wait_job

HOURS = ["4", "0", "-3", "2.5", "1e3", "-7.25E-2", "123456789", "0.1"]


@pytest.fixture(scope="module")
def served(client: TestClient) -> TestClient:
    wait_job(client, client.post("/fit", json={**TUTORIAL, "fit_intercept": True}).json()["id"])
    return client


@pytest.fixture
def routed(served: TestClient) -> Iterator[list[str]]:
    """The queries that FastAPI's route of GET /predict answered while the test ran (it reads
    the store through get_store; the fast path reads it from the app's state)."""
    queries: list[str] = []

    async def counted(request: Request) -> Store:
        queries.append(request.url.query)
        return await get_store(request)

    app = served.app
    assert isinstance(app, FastAPI)
    app.dependency_overrides[get_store] = counted
    try:
        yield queries
    finally:
        del app.dependency_overrides[get_store]


@pytest.mark.parametrize("hours", HOURS)
def test_fast_answer_equals_the_route_answer(
    served: TestClient, routed: list[str], hours: str
) -> None:
    fast = served.get(f"/predict?hours={hours}")
    assert routed == []  # the fast path answered: FastAPI's route never ran
    # an extra parameter is not the fast path's business: FastAPI's route answers it
    routed_answer = served.get(f"/predict?hours={hours}&via=route")
    assert routed == [f"hours={hours}&via=route"]
    assert fast.status_code == routed_answer.status_code == 200
    assert fast.json() == routed_answer.json()
    assert fast.headers["content-type"] == routed_answer.headers["content-type"]
    assert fast.headers["content-type"] == "application/json"
    model = served.get("/model").json()
    assert fast.json()["score"] == model["w"] * float(hours) + model["b"]


# A "+" in a query is a space: the route reads `1e+3` as `1e 3`, which the fast path once
# answered as 1000.
UNUSUAL = ["nan", "inf", "1e400", "2e9", "4_0", "%204", "0x10", "%34", "", "1e%2B3", "1e+3"]


@pytest.mark.parametrize("hours", UNUSUAL)
def test_anything_unusual_is_left_to_the_route(served: TestClient, hours: str) -> None:
    r = served.get(f"/predict?hours={hours}")
    routed = served.get(f"/predict?hours={hours}&via=route")
    assert r.status_code == routed.status_code
    assert r.headers["content-type"] == routed.headers["content-type"]
    if r.status_code == 200:
        assert r.json() == routed.json()
    else:
        assert r.status_code == 422
        assert r.json()["type"] == routed.json()["type"] == "validation-error"


# What float() reads but JSON does not write.
NOT_JSON = ["04", "-04", "4.", ".5", "+4", "1e+3", "4_0", "%204", "infinity", "%EF%BC%94"]


@pytest.mark.parametrize("hours", NOT_JSON)
def test_hours_not_written_as_json_writes_a_number_are_refused_by_both(
    served: TestClient, hours: str
) -> None:
    for url in (f"/predict?hours={hours}", f"/predict?hours={hours}&via=route"):
        r = served.get(url)
        assert r.status_code == 422, (url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        [error] = r.json()["errors"]
        assert error["field"] == "hours"
        assert "as JSON writes it" in error["message"]


def test_fast_answers_are_counted_under_the_routes_template(served: TestClient) -> None:
    """RequestObserver labels a fast answer by the real route of GET /predict, as routing
    would have: one series for both ways of answering."""

    def answered() -> float:
        metrics = served.get("/metrics").text
        series = 'sgd_http_requests_total{method="GET",route="/predict",status="200"} '
        (line,) = [m for m in metrics.splitlines() if m.startswith(series)]
        return float(line.removeprefix(series))

    before = answered()
    served.get("/predict?hours=4")
    served.get("/predict?hours=4&via=route")
    assert answered() == before + 2
