"""The prediction routes (service.http.direct): one handler each, found by the Shortcut or by
the router; GET /predict's quick reading of `?hours=<number>` answers as FastAPI's reading does."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.core.schemas import Prediction
from service.http.direct import Shortcut
from tests.conftest import TUTORIAL, wait_job

HOURS = ["4", "0", "-3", "2.5", "1e3", "-7.25E-2", "123456789", "0.1", "1e-5", "0.0000001"]


@pytest.fixture(scope="module")
def served(client: TestClient) -> TestClient:
    wait_job(client, client.post("/fit", json={**TUTORIAL, "fit_intercept": True}).json()["id"])
    return client


@pytest.fixture
def routed(served: TestClient) -> Iterator[None]:
    """The app without its Shortcut: every request found by FastAPI's router."""
    app = served.app
    assert isinstance(app, FastAPI)
    layer: Any = app.middleware_stack
    while not isinstance(layer.app, Shortcut):  # the layer in front of it
        layer = layer.app
    shortcut = layer.app
    layer.app = shortcut.app
    try:
        yield
    finally:
        layer.app = shortcut


@pytest.mark.parametrize("hours", HOURS)
def test_the_quick_reading_of_hours_equals_fastapis(served: TestClient, hours: str) -> None:
    quick = served.get(f"/predict?hours={hours}")
    # another parameter: read by FastAPI's own function, as every query it does not know
    read = served.get(f"/predict?hours={hours}&via=route")
    assert quick.status_code == read.status_code == 200
    assert quick.content == read.content
    assert quick.headers["content-type"] == read.headers["content-type"] == "application/json"
    model = served.get("/model").json()
    assert quick.json()["score"] == model["w"] * float(hours) + model["b"]
    # as FastAPI's route wrote a Prediction: pydantic's JSON (1e-05 is written 0.00001)
    written = Prediction.model_validate_json(quick.content).model_dump_json(exclude_none=True)
    assert quick.content == written.encode()


# With ?coverage= (and method, version): read at once when each is as the route takes it, else
# by FastAPI; the same answers, errors included.
QUERIES = [
    "hours=4&coverage=0.9",
    "hours=4&coverage=0.9&method=gaussian",
    "coverage=0.95&hours=-2.5&version=1",
    "hours=4&method=gaussian&coverage=0.5&version=1",
    "hours=4&coverage=0.999",
    "hours=4&coverage=1",
    "hours=4&coverage=0.49",
    "hours=4&coverage=1e-1",
    "hours=4&method=gaussian",
    "hours=4&coverage=0.9&method=conformal",
    "hours=4&coverage=0.9&method=other",
    "hours=4&coverage=nan",
    "hours=4&coverage=0.9&method=",
    "hours=4&coverage=&method=gaussian",
    "hours=4&coverage=0.9&coverage=0.95",
]


@pytest.mark.parametrize("query", QUERIES)
def test_the_quick_reading_of_coverage_equals_fastapis(served: TestClient, query: str) -> None:
    quick = served.get(f"/predict?{query}")
    read = served.get(f"/predict?{query}&via=route")
    assert quick.status_code == read.status_code
    assert quick.content == read.content
    if quick.status_code == 200:
        interval = quick.json()["interval"]
        assert interval["lower"] < quick.json()["score"] < interval["upper"]


V2 = "/v2/models/sgd"
ONE = {"inputs": [{"name": "hours", "datatype": "FP64", "shape": [1], "data": [4]}]}
# Requests to the prediction routes, as the Shortcut takes them or leaves them to the router
REQUESTS: list[tuple[str, str, object]] = [
    ("GET", "/predict?hours=4", None),
    ("GET", "/predict?hours=4&version=1", None),
    ("GET", "/predict?hours=x", None),
    ("GET", "/predict", None),
    ("HEAD", "/predict?hours=4", None),
    ("PUT", "/predict", None),
    ("GET", "/predict/?hours=4", None),
    ("POST", "/predict", {"hours": [1, 2, 4]}),
    ("POST", "/predict", {"hours": [1, 2, 4], "version": 99}),
    ("POST", "/predict", {"hours": []}),
    ("POST", f"{V2}/infer", ONE),
    ("POST", f"{V2}/versions/1/infer", ONE),
    ("POST", f"{V2}/versions/x/infer", ONE),
    ("POST", f"{V2}/versions/99/infer", ONE),
    ("POST", "/v2/models/other/infer", ONE),
    ("POST", "/v2/models//infer", ONE),
    ("POST", f"{V2}/infer/", ONE),
    ("POST", f"{V2}/a/b/infer", ONE),
    ("GET", f"{V2}/infer", None),
    ("POST", f"{V2}/infer", {"inputs": []}),
]


@pytest.mark.parametrize(("method", "url", "body"), REQUESTS)
def test_the_shortcut_answers_as_the_router_does(
    served: TestClient, request: pytest.FixtureRequest, method: str, url: str, body: object
) -> None:
    """One handler a route: found by the Shortcut or by the router, a request gets the same
    answer, byte for byte, headers included."""
    kept = served.get("/models").json()["versions"][-1]["version"]
    url = url.replace("version=1", f"version={kept}").replace("versions/1/", f"versions/{kept}/")
    quick = served.request(method, url, json=body)
    request.getfixturevalue("routed")
    routed = served.request(method, url, json=body)
    assert (quick.status_code, quick.content) == (routed.status_code, routed.content)
    varying = ("x-request-id", "x-prediction-id")  # random: the id's version is the same
    assert [h for h in quick.headers.items() if h[0] not in varying] == [
        h for h in routed.headers.items() if h[0] not in varying
    ]
    ids = [r.headers.get("x-prediction-id", "").partition("-")[0] for r in (quick, routed)]
    assert ids[0] == ids[1]


# A "+" in a query is a space: the route reads `1e+3` as `1e 3`, which the fast path once
# answered as 1000.
UNUSUAL = ["nan", "inf", "1e400", "2e9", "4_0", "%204", "0x10", "%34", "", "1e%2B3", "1e+3"]


@pytest.mark.parametrize("hours", UNUSUAL)
def test_anything_unusual_is_read_by_fastapis_function(served: TestClient, hours: str) -> None:
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
    """RequestObserver labels an answer by the route of GET /predict, as routing would have:
    one series for both readings."""

    def answered() -> float:
        metrics = served.get("/metrics").text
        series = 'sgd_http_requests_total{method="GET",route="/predict",status="200"} '
        (line,) = [m for m in metrics.splitlines() if m.startswith(series)]
        return float(line.removeprefix(series))

    served.get("/predict?hours=4")  # the series exists
    before = answered()
    served.get("/predict?hours=4")
    served.get("/predict?hours=4&via=route")
    assert answered() == before + 2
