"""Intervals through a real server, on both stores: GET and POST /predict and /v2 answer the
interval the fit's held-out rows (conformal) or training rows (gaussian) give, the same on every
route; a version that cannot answer a method says so, and nothing else changes.

What the numbers equal (MAPIE, statsmodels) and how often they hold the truth is
tests/test_intervals.py's; here, that every route serves them.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from scipy.special import stdtrit
from tritonclient.utils import InferenceServerException

from service.core.engine import split
from tests.conftest import STORES, TIMEOUT, Server, start_server, store_env, wait_job

pytestmark = pytest.mark.timeout(90)

MODEL = "sgd"
X = [float(v) for v in range(1, 41)]
Y = [2 * x + 1 + math.sin(3 * x) for x in X]  # y = 2x + 1, and a wobble as the noise
FIT = {
    "x": X,
    "y": Y,
    "validation_fraction": 0.5,
    "fit_intercept": True,
    "batch_size": None,
    "epochs": 3000,
    "learning_rate": 0.001,
    "seed": 7,
}
HOURS = [-3.0, 0.0, 4.0, 12.5, 100.0]


@dataclass
class Served:
    """Version 1: fitted with a split (both methods); version 2, served: without (gaussian)."""

    server: Server
    v1: dict[str, Any]
    v2: dict[str, Any]


@pytest.fixture(scope="module", params=STORES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    srv = start_server(
        str(tmp_path_factory.mktemp("intervals")), **store_env(request, request.param)
    )
    try:
        with srv.client() as http:
            for body in (FIT, {**FIT, "validation_fraction": 0.0}):
                job = http.post("/fit", json=body).json()
                assert wait_job(http, job["id"])["status"] == "succeeded"
            v1, v2 = (http.get(f"/models/{v}").json() for v in (1, 2))
        yield Served(srv, v1, v2)
    finally:
        srv.stop()


def residuals(model: dict[str, Any]) -> np.ndarray:
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64)
    _, _, held_x, held_y = split(x, y, 0.5, 7)
    assert held_x is not None
    assert held_y is not None
    return np.sort(np.abs(held_y.numpy() - (held_x.numpy() * model["w"] + model["b"])))


def gaussian_half(model: dict[str, Any], hours: float, coverage: float) -> float:
    g = model["intervals"]["gaussian"]
    h = (1 / g["n"] if g["fit_intercept"] else 0.0) + (hours - g["center"]) ** 2 / g["spread"]
    t = float(stdtrit(g["df"], 1 - (1 - coverage) / 2))
    return t * float(g["s"]) * math.sqrt(1 + h)


def test_a_version_says_what_it_can_answer(served: Served) -> None:
    one, two = served.v1["intervals"], served.v2["intervals"]
    assert one["methods"] == ["conformal", "gaussian"]
    assert one["conformal"]["n"] == 20
    assert one["gaussian"]["n"] == 20
    assert one["gaussian"]["df"] == 18  # w and b
    assert two["methods"] == ["gaussian"]
    assert two["gaussian"]["n"] == 40
    assert "validation_fraction" in two["missing"]["conformal"]
    expected = residuals(served.v1)[math.ceil(21 * 0.9) - 1]
    assert one["conformal"]["half_widths"]["0.9"] == expected


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.9, 0.95])
def test_get_and_post_answer_the_conformal_interval(served: Served, coverage: float) -> None:
    q = residuals(served.v1)[math.ceil(round(21 * coverage, 9)) - 1]
    with served.server.client() as http:
        many = http.post("/predict", json={"hours": HOURS, "coverage": coverage, "version": 1})
        assert many.status_code == 200
        body = many.json()
        assert (body["coverage"], body["method"]) == (coverage, "conformal")
        for i, hours in enumerate(HOURS):
            one = http.get("/predict", params={"hours": hours, "coverage": coverage, "version": 1})
            answer = one.json()
            assert answer["interval"] == {
                "lower": answer["score"] - q,
                "upper": answer["score"] + q,
                "coverage": coverage,
                "method": "conformal",
            }
            # every route: the same numbers, bit for bit
            assert (body["scores"][i], body["lower"][i], body["upper"][i]) == (
                answer["score"],
                answer["interval"]["lower"],
                answer["interval"]["upper"],
            )


def test_the_gaussian_interval_widens_away_from_the_data(served: Served) -> None:
    with served.server.client() as http:
        answers = [
            http.get("/predict", params={"hours": h, "coverage": 0.95}).json() for h in HOURS
        ]
    halves = []
    for hours, answer in zip(HOURS, answers, strict=True):
        assert answer["model_version"] == 2
        interval = answer["interval"]
        assert interval["method"] == "gaussian"  # all version 2 has
        half = gaussian_half(served.v2, hours, 0.95)
        assert interval["lower"] == pytest.approx(answer["score"] - half, rel=1e-12)
        assert interval["upper"] == pytest.approx(answer["score"] + half, rel=1e-12)
        halves.append(half)
    assert halves[-1] > halves[2]  # 100 hours is far from the training x, 4 is among them


def test_an_unbounded_conformal_interval_is_null_on_predict_and_refused_on_v2(
    served: Served,
) -> None:
    """20 held-out rows bound coverages up to 20/21: 0.99 has no finite conformal bound."""
    with served.server.client() as http:
        one = http.get("/predict", params={"hours": 4, "coverage": 0.99, "version": 1}).json()
        assert (one["interval"]["lower"], one["interval"]["upper"]) == (None, None)
        many = http.post("/predict", json={"hours": [4], "coverage": 0.99, "version": 1}).json()
        assert (many["lower"], many["upper"]) == (None, None)
        body = {
            "inputs": [{"name": "hours", "datatype": "FP64", "shape": [1], "data": [4]}],
            "parameters": {"coverage": 0.99},
        }
        r = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
        assert r.status_code == 409
        assert "unbounded" in r.json()["error"]
        assert "20/21" in r.json()["error"]


def test_a_method_the_version_lacks_is_a_409_that_names_the_field(served: Served) -> None:
    with served.server.client() as http:
        before = http.get("/models").json()
        r = http.get("/predict", params={"hours": 4, "coverage": 0.9, "method": "conformal"})
        assert r.status_code == 409
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["type"] == "interval-unavailable"
        assert problem["errors"][0]["field"] == "method"
        assert "validation_fraction" in problem["detail"]
        r = http.post("/predict", json={"hours": [4], "coverage": 0.9, "method": "conformal"})
        assert (r.status_code, r.json()["type"]) == (409, "interval-unavailable")
        body = {
            "inputs": [{"name": "hours", "datatype": "FP64", "shape": [1], "data": [4]}],
            "parameters": {"coverage": 0.9, "method": "conformal"},
        }
        r = http.post(f"/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 409
        assert "validation_fraction" in r.json()["error"]
        assert http.get("/models").json() == before  # nothing changed


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_the_bounds(served: Served, binary: bool) -> None:
    client = triton.InferenceServerClient(
        served.server.url.removeprefix("http://"),
        connection_timeout=TIMEOUT,
        network_timeout=TIMEOUT,
    )
    try:
        tensor = triton.InferInput("hours", [len(HOURS)], "FP64")
        tensor.set_data_from_numpy(np.array(HOURS), binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(name, binary_data=binary)
            for name in ("score_upper", "score", "score_lower")
        ]
        result = client.infer(MODEL, [tensor], "1", outputs=outputs, parameters={"coverage": 0.8})
        answer = result.get_response()
        assert [o["name"] for o in answer["outputs"]] == ["score_upper", "score", "score_lower"]
        assert answer["parameters"] == {"coverage": 0.8, "method": "conformal"}
        with pytest.raises(InferenceServerException) as raised:
            client.infer(MODEL, [tensor], "1", outputs=outputs[:1])
        assert "set the parameter 'coverage'" in raised.value.message()
    finally:
        client.close()
    with served.server.client() as http:
        body = http.post("/predict", json={"hours": HOURS, "coverage": 0.8, "version": 1}).json()
    assert result.as_numpy("score").tolist() == body["scores"]
    assert result.as_numpy("score_lower").tolist() == body["lower"]
    assert result.as_numpy("score_upper").tolist() == body["upper"]


def test_v2_answers_every_output_when_none_is_named(served: Served) -> None:
    body = {
        "inputs": [{"name": "hours", "datatype": "FP64", "shape": [2], "data": [1, 2]}],
        "parameters": {"coverage": 0.9, "method": "gaussian"},
    }
    with served.server.client() as http:
        answer = http.post(f"/v2/models/{MODEL}/infer", json=body).json()
        plain = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": body["inputs"]}).json()
        rest = http.post("/predict", json={"hours": [1, 2], "coverage": 0.9}).json()
    names = [o["name"] for o in answer["outputs"]]
    assert names == ["score", "score_lower", "score_upper"]
    assert [o["data"] for o in answer["outputs"]] == [rest["scores"], rest["lower"], rest["upper"]]
    assert [o["name"] for o in plain["outputs"]] == ["score"]
    assert "parameters" not in plain
