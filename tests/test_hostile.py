"""Hostile callers cost nothing: requests built to make the service work hard, against a real
server, each asserting the bound it proves (issue 26; more cases join as its points land).
"""

import httpx
import orjson
import pytest

from service.errors import MAX_LISTED_ERRORS
from tests.conftest import TIMEOUT, Server

pytestmark = pytest.mark.timeout(120)

NULLS = 250_000  # per column: a 2.5 MB body


def _listed_and_counted(problem: dict[str, object], total: int) -> None:
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert len(errors) == MAX_LISTED_ERRORS + 1
    assert errors[-1]["code"] == "too_many_errors"
    assert errors[-1]["message"].startswith(f"{total - MAX_LISTED_ERRORS} more errors")
    assert len(str(problem["detail"])) < 1000


def test_a_body_of_nulls_gets_a_small_answer(shared_server: Server) -> None:
    """Before: a 2 MB body of nulls got a 38 MB 422 (one error per value), and a 4.8 MiB one
    blocked the event loop for seconds. Now the first errors are listed and the rest counted."""
    body = orjson.dumps({"x": [None] * NULLS, "y": [None] * NULLS})
    with httpx.Client(base_url=shared_server.url, timeout=TIMEOUT) as http:
        r = http.post("/fit", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        assert len(r.content) < 10_000
        problem = r.json()
        _listed_and_counted(problem, 2 * NULLS)
        assert problem["errors"][0] == {
            "field": "x[0]",
            "message": "Input should be a valid number",
            "code": "float_type",
        }
        assert problem["errors"][MAX_LISTED_ERRORS - 1]["field"] == f"x[{MAX_LISTED_ERRORS - 1}]"
        # a few bad values among good ones are still all listed
        few = {"x": [1.0] * 100 + [None] * 3, "y": [2.0] * 103}
        r = http.post("/fit", json=few)
        assert r.status_code == 422
        assert [e["field"] for e in r.json()["errors"]] == ["x[100]", "x[101]", "x[102]"]


def test_a_batch_of_nulls_gets_a_small_answer(shared_server: Server) -> None:
    """The same cap on the routes FastAPI validates itself: POST /predict's list."""
    with httpx.Client(base_url=shared_server.url, timeout=TIMEOUT) as http:
        r = http.post("/predict", json={"hours": [None] * 5_000})
        assert r.status_code == 422
        _listed_and_counted(r.json(), 5_000)
