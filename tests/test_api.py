"""The HTTP API through the app factory: the tutorial, the knobs, and the errors callers get
(their types are listed in the README's Errors section and defined in service/core/errors.py)."""

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.numbers import JSON_NUMBER

# The in-process TestClient takes no request timeout; pytest-timeout bounds every test.
from tests.conftest import TUTORIAL, slow_fit, wait_job, wait_until

PROBLEM = "application/problem+json"
Factory = Callable[..., TestClient]


def fit(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/fit", json={**TUTORIAL, **body})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def fit_and_wait(client: TestClient, **body: Any) -> dict[str, Any]:
    return wait_job(client, fit(client, **body)["id"])


def no_nan(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in a response")

    return json.loads(text, parse_constant=refuse)


def state(client: TestClient) -> tuple[Any, Any]:
    """What a bad request must leave untouched: the served model and the jobs (a running job's
    progress moves on by itself, so it is left out)."""
    model = client.get("/model")
    jobs = client.get("/jobs", params={"limit": 100}).json()
    for job in jobs["jobs"]:
        if job["status"] == "running":
            job["progress"] = "(running)"
    return (model.status_code, model.json()), jobs


def assert_problem(r: Any, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = no_nan(r.text)
    assert body["type"] == type_
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


# -- the tutorial -------------------------------------------------------------------------


def test_the_tutorial_as_a_service(make_client: Factory) -> None:
    client = make_client()
    r = client.post("/fit", json=TUTORIAL)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    params = job["params"]
    assert params["epochs"] == 100
    assert params["learning_rate"] == 0.01
    assert params["init_w"] == 1.0
    assert params["batch_size"] == 1
    assert params["fit_intercept"] is False
    assert isinstance(params["seed"], int)  # drawn, and recorded
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"] == {"epoch": 100, "epochs": 100}
    pred = client.get("/predict", params={"hours": 4}).json()
    assert abs(pred["score"] - 8.0) < 0.01
    assert pred["hours"] == 4.0
    assert pred["model_version"] == done["result"]["model_version"] == 1
    hist = client.get("/history").json()
    assert hist["job_id"] == job["id"]
    assert hist["epoch"] == list(range(100))
    assert hist["w"][0] == 1.0
    assert len(hist["w"]) == len(hist["loss"]) == 100
    assert hist["b"] is None
    # the tutorial's first loss: one sample (x, 2x) at w = 1 gives (x - 2x)^2 = x^2
    assert hist["loss"][0] in (1.0, 4.0, 9.0)
    model = client.get("/model").json()
    assert model["version"] == 1
    assert model["job_id"] == job["id"]
    assert model["w"] == done["result"]["w"]


def test_same_seed_same_history_other_seed_another(client: TestClient) -> None:
    histories = []
    for seed in (11, 11, 12):
        job = fit_and_wait(client, seed=seed)
        assert job["params"]["seed"] == seed
        h = client.get("/history", params={"job_id": job["id"]}).json()
        histories.append((h["w"], h["loss"]))
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]


def test_full_batch_and_mini_batch(client: TestClient) -> None:
    full = fit_and_wait(client, batch_size=None, seed=1, epochs=300)
    again = fit_and_wait(client, batch_size=None, seed=2, epochs=300)
    assert full["params"]["batch_size"] is None
    # full-batch gradient descent draws nothing: the seed cannot matter
    assert full["result"]["w"] == again["result"]["w"]
    assert abs(full["result"]["w"] - 2.0) < 1e-3
    mini = fit_and_wait(client, batch_size=2, seed=1, epochs=300)
    assert abs(mini["result"]["w"] - 2.0) < 1e-3


def test_fit_intercept_learns_b(client: TestClient) -> None:
    x = [0.0, 1.0, 2.0, 3.0, 4.0]
    job = fit_and_wait(
        client,
        x=x,
        y=[3 * v + 1 for v in x],
        fit_intercept=True,
        batch_size=None,
        learning_rate=0.05,
        epochs=5000,
    )
    assert job["status"] == "succeeded"
    assert abs(job["result"]["w"] - 3.0) < 1e-6
    assert abs(job["result"]["b"] - 1.0) < 1e-6
    assert job["result"]["mse"] < 1e-9
    hist = client.get("/history", params={"job_id": job["id"]}).json()
    assert hist["b"][0] == 0.0
    assert len(hist["b"]) == len(hist["w"])
    pred = client.post("/predict", json={"hours": [1, 2, 4]}).json()
    model = client.get("/model").json()
    assert pred["model_version"] == model["version"]
    assert pred["scores"] == [model["w"] * h + model["b"] for h in (1, 2, 4)]


def test_divergence_fails_the_job_and_serves_nothing(client: TestClient) -> None:
    fit_and_wait(client)  # make sure some model is served
    before = state(client)[0]
    job = fit_and_wait(client, learning_rate=10)
    assert job["status"] == "failed"
    error = job["error"]
    assert error["type"] == "diverged"
    assert isinstance(error["epoch"], int)
    assert str(error["epoch"]) in error["detail"]
    assert "smaller learning_rate" in error["detail"]
    assert job["result"] is None
    assert state(client)[0] == before
    r = client.get("/history", params={"job_id": job["id"]})
    hist = no_nan(r.text)
    assert hist["status"] == "failed"
    assert hist["total_epochs"] == error["epoch"]  # every epoch before the bad one


def test_big_limits_are_accepted(client: TestClient) -> None:
    n = 1_000_000
    r = client.post("/fit", json=slow_fit(n, epochs=1_000_000))
    assert r.status_code == 202
    job = r.json()
    assert job["n_samples"] == n
    cancelled = client.post(f"/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"


# -- jobs ---------------------------------------------------------------------------------


def test_cancel_a_running_job(client: TestClient) -> None:
    job = client.post("/fit", json=slow_fit()).json()
    wait_until(
        lambda: client.get(f"/jobs/{job['id']}").json()["progress"]["epoch"] > 0, what="progress"
    )
    r = client.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert_problem(again, 409, "job-ended")
    assert_problem(client.post("/jobs/nope/cancel"), 404, "job-not-found")


def test_jobs_are_listed_newest_first_and_bounded(client: TestClient) -> None:
    ids = [fit(client)["id"] for _ in range(3)]
    for job_id in ids:
        wait_job(client, job_id)
    listed = client.get("/jobs", params={"limit": 3}).json()["jobs"]
    assert [j["id"] for j in listed] == ids[::-1]
    assert_problem(client.get("/jobs", params={"limit": 0}), 422, "validation-error")
    assert_problem(client.get("/jobs/unknown"), 404, "job-not-found")


def test_queue_full_is_429_with_retry_after(make_client: Factory) -> None:
    client = make_client(max_queued_jobs=1)
    running = client.post("/fit", json=slow_fit(epochs=1_000_000)).json()
    wait_until(lambda: client.get(f"/jobs/{running['id']}").json()["status"] == "running")
    queued = client.post("/fit", json=TUTORIAL).json()
    before = state(client)
    r = client.post("/fit", json=TUTORIAL)
    assert_problem(r, 429, "queue-full")
    assert int(r.headers["retry-after"]) >= 1
    assert state(client) == before  # the refused job left no trace
    for job in (queued, running):
        client.post(f"/jobs/{job['id']}/cancel")


def test_idempotency_key(client: TestClient) -> None:
    headers = {"Idempotency-Key": "fit-abc-1"}
    first = client.post("/fit", json=TUTORIAL, headers=headers)
    again = client.post("/fit", json=TUTORIAL, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    wait_job(client, first.json()["id"])
    before = state(client)
    other = client.post("/fit", json={**TUTORIAL, "epochs": 5}, headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")
    assert state(client)[1] == before[1]


# -- before any model ----------------------------------------------------------------------


def test_before_the_first_fit(make_client: Factory) -> None:
    client = make_client()
    for r in (
        client.get("/predict", params={"hours": 4}),
        client.post("/predict", json={"hours": [1]}),
        client.get("/model"),
    ):
        assert_problem(r, 503, "model-not-ready")
    assert_problem(client.get("/history"), 404, "history-not-found")
    # a missing model does not make the service unready: it must still take fits
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}


# -- bad input: status, problem type, and nothing changed --------------------------------


@pytest.fixture(scope="module")
def served(client: TestClient) -> Iterator[TestClient]:
    fit_and_wait(client)
    return client


BAD_FITS: list[tuple[str, str | dict[str, Any], str]] = [
    ("nan literal", '{"x": [1, NaN], "y": [2, 4]}', "x[1]"),
    ("infinity literal", '{"x": [1, 2], "y": [2, Infinity]}', "y[1]"),
    ("overflowing literal", '{"x": [1, 1e400], "y": [2, 4]}', "x[1]"),
    ("string", {"x": [1, "3"], "y": [2, 4]}, "x[1]"),
    ("boolean", {"x": [1, True], "y": [2, 4]}, "x[1]"),
    ("null", {"x": [1, None], "y": [2, 4]}, "x[1]"),
    ("length mismatch", {"x": [1, 2], "y": [2]}, "y"),
    ("empty", {"x": [], "y": []}, "x"),
    ("out of range", {"x": [1, 2e9], "y": [2, 4]}, "x[1]"),
    ("all x zero", {"x": [0, 0], "y": [2, 4]}, "x"),
    ("unknown field", {**TUTORIAL, "momentum": 0.9}, "momentum"),
    ("missing y", {"x": [1]}, "y"),
    ("zero epochs", {**TUTORIAL, "epochs": 0}, "epochs"),
    ("too many epochs", {**TUTORIAL, "epochs": 10**9}, "epochs"),
    ("float epochs", {**TUTORIAL, "epochs": 10.5}, "epochs"),
    ("zero learning rate", {**TUTORIAL, "learning_rate": 0}, "learning_rate"),
    ("negative learning rate", {**TUTORIAL, "learning_rate": -0.1}, "learning_rate"),
    ("zero batch", {**TUTORIAL, "batch_size": 0}, "batch_size"),
    ("negative seed", {**TUTORIAL, "seed": -1}, "seed"),
    ("huge init_w", {**TUTORIAL, "init_w": 1e300}, "init_w"),
    ("not json", "{x: [1]}", "body"),
    ("not an object", "[1, 2, 3]", "body"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_FITS, ids=[c[0] for c in BAD_FITS])
def test_bad_fit_is_422_and_changes_nothing(
    served: TestClient, case: str, body: str | dict[str, Any], field: str
) -> None:
    before = state(served)
    if isinstance(body, str):
        headers = {"content-type": "application/json"}
        r = served.post("/fit", content=body, headers=headers)
    else:
        r = served.post("/fit", json=body)
    problem = assert_problem(r, 422, "validation-error")
    fields = [e["field"] for e in problem["errors"]]
    assert any(f.startswith(field) for f in fields), fields
    assert all(e["message"] for e in problem["errors"])
    assert state(served) == before


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (("GET", "/predict?hours=abc", None), "hours"),
        (("GET", "/predict?hours=2e9", None), "hours"),
        (("GET", "/predict", None), "hours"),
        (("POST", "/predict", {"hours": [1, 2e9]}), "hours[1]"),
        (("POST", "/predict", {"hours": [1, "a"]}), "hours[1]"),
        (("POST", "/fit", {"x": [1, 2, 3e9], "y": [1, 2, 3]}), "x[2]"),
        (("POST", "/fit", {"x": [1, 2], "y": [1, "b"]}), "y[1]"),
    ],
)
def test_problems_name_fields_as_a_caller_writes_them(
    served: TestClient, request_: tuple[str, str, Any], field: str
) -> None:
    method, url, body = request_
    problem = assert_problem(served.request(method, url, json=body), 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == [field]


@pytest.mark.parametrize("hours", ["abc", "nan", "inf", "-Infinity", "1e400", "2e9", ""])
def test_bad_hours_are_422(served: TestClient, hours: str) -> None:
    before = state(served)
    r = served.get("/predict", params={"hours": hours})
    assert_problem(r, 422, "validation-error")
    assert state(served) == before


@pytest.mark.parametrize(
    "body",
    [{"hours": []}, {"hours": [1, None]}, {"hours": [1, "2"]}, {"hours": 4}, {"hour": [1]}],
)
def test_bad_batch_predictions_are_422(served: TestClient, body: dict[str, Any]) -> None:
    assert_problem(served.post("/predict", json=body), 422, "validation-error")


def test_too_many_hours_is_422(make_client: Factory) -> None:
    client = make_client(max_predict_batch=3)
    fit_and_wait(client)
    ok = client.post("/predict", json={"hours": [1, 2, 3]})
    assert ok.status_code == 200
    assert len(ok.json()["scores"]) == 3
    r = client.post("/predict", json={"hours": [1, 2, 3, 4]})
    assert_problem(r, 422, "validation-error")


def test_method_not_allowed_lists_every_method(served: TestClient) -> None:
    r = served.delete("/predict")
    assert_problem(r, 405, "method-not-allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    r = served.get("/fit")
    assert_problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "POST"


def test_unknown_route_is_a_problem(served: TestClient) -> None:
    assert_problem(served.get("/nowhere"), 404, "not-found")


def test_history_paging_and_thinning(served: TestClient) -> None:
    job = fit_and_wait(served, epochs=1000)
    q = {"job_id": job["id"]}
    page = served.get("/history", params={**q, "since": 100, "limit": 50}).json()
    assert page["epoch"] == list(range(100, 150))
    assert page["next_since"] == 150
    assert page["total_epochs"] == 1000
    thin = served.get("/history", params={**q, "max_points": 10}).json()
    assert thin["count"] == len(thin["epoch"]) <= 10
    assert thin["epoch"][0] == 0
    assert thin["epoch"][-1] == 999
    assert thin["stride"] > 1
    whole = served.get("/history", params=q).json()
    assert whole["count"] == 1000
    assert whole["stride"] == 1
    assert whole["next_since"] is None
    assert [whole["w"][e] for e in thin["epoch"]] == thin["w"]
    assert_problem(served.get("/history", params={"job_id": "nope"}), 404, "job-not-found")
    assert_problem(served.get("/history", params={"max_points": 1}), 422, "validation-error")


def test_huge_model_times_huge_hours_never_answers_infinity(make_client: Factory) -> None:
    client = make_client(max_abs_value=1e200)
    big = 1e200
    fit_and_wait(client, x=[1.0], y=[big], init_w=big, batch_size=None, epochs=1)
    model = client.get("/model").json()
    assert math.isfinite(model["w"])
    r = client.get("/predict", params={"hours": 1e200})
    assert_problem(r, 422, "prediction-out-of-range")


# -- body limit and auth -----------------------------------------------------------------


def test_body_over_the_limit_is_413_with_or_without_content_length(make_client: Factory) -> None:
    client = make_client(max_body_bytes=4096)
    big = {"x": [1.0] * 2000, "y": [2.0] * 2000}
    assert_problem(client.post("/fit", json=big), 413, "payload-too-large")

    def chunks() -> Iterator[bytes]:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = client.post("/fit", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(r, 413, "payload-too-large")
    assert client.get("/jobs").json()["jobs"] == []
    small = client.post("/fit", json=TUTORIAL)
    assert small.status_code == 202


def test_token_guards_writes_only(make_client: Factory) -> None:
    client = make_client(api_token="s3cret-token")
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret-token"},
        {"Authorization": "Bearer s3cret-tokén".encode()},  # raw UTF-8 bytes
    ):
        r = client.post("/fit", json=TUTORIAL, headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/jobs").json()["jobs"] == []
    good = {"Authorization": "Bearer s3cret-token"}
    job = client.post("/fit", json=TUTORIAL, headers=good).json()
    assert_problem(client.post(f"/jobs/{job['id']}/cancel"), 401, "unauthorized")
    wait_job(client, job["id"])
    assert client.get("/predict", params={"hours": 4}).status_code == 200


def test_openapi_lists_the_problem_answers(served: TestClient) -> None:
    spec = served.get("/openapi.json").json()
    fit_responses = spec["paths"]["/fit"]["post"]["responses"]
    assert {"202", "401", "413", "422", "429", "503"} <= set(fit_responses)
    assert PROBLEM in fit_responses["422"]["content"]
    assert {"200", "422", "503"} <= set(spec["paths"]["/predict"]["get"]["responses"])
    assert "409" in spec["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"]


def test_openapi_states_how_numbers_in_queries_and_paths_are_written(served: TestClient) -> None:
    """Every integer and number parameter shows the text it takes, beside its documented type
    and bounds (a bound after a validator once showed as a raw `ge`, which OpenAPI ignores)."""
    spec = served.get("/openapi.json").json()
    seen = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for param in operation.get("parameters", []):
                schema = param["schema"]
                for branch in schema.get("anyOf", [schema]):
                    if branch.get("type") in ("integer", "number"):
                        seen.add((method, path, param["name"]))
                        assert "pattern" in branch, (method, path, param["name"])
                        assert not {"ge", "gt", "le", "lt"} & set(branch), branch
    assert {
        ("get", "/jobs", "limit"),
        ("get", "/models", "limit"),
        ("get", "/models/{version}", "version"),
        ("post", "/models/{version}/serve", "version"),
        ("get", "/history", "since"),
        ("get", "/history", "limit"),
        ("get", "/history", "max_points"),
        ("get", "/predict", "version"),
        ("get", "/predict", "hours"),
    } <= seen
    [limit] = spec["paths"]["/jobs"]["get"]["parameters"]
    assert limit["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "pattern": "^[0-9]+$",
        "default": 20,
        "title": "Limit",
    }
    for path, method in (("/models/{version}", "get"), ("/models/{version}/serve", "post")):
        version = spec["paths"][path][method]["parameters"][0]
        assert version["schema"] == {
            "type": "integer",
            "minimum": 1,  # "-1" is no version: said, not only refused
            "pattern": "^[0-9]+$",
            "title": "Version",
        }
    hours = spec["paths"]["/predict"]["get"]["parameters"][0]["schema"]
    assert hours["type"] == "number"
    assert hours["pattern"] == f"^{JSON_NUMBER}$"


# -- numbers a caller can trust, work a caller cannot abuse ------------------------------------


# Fields that are null by design (off, absent or undefined), never as a NaN in disguise.
NULLABLE = {
    "batch_size",  # every sample
    "tol",  # no early stopping
    "init_from",  # no warm start
    "canary",  # not published as a canary
    "val_mse",  # no validation split
    "val_r2",
    "train_r2",  # undefined for constant y
    "not_published_because",  # published
}


def no_null_numbers(job: dict[str, Any]) -> None:
    for section in ("result", "progress", "params"):
        for name, value in (job.get(section) or {}).items():
            if name not in NULLABLE:
                assert value is not None, (section, name, job)


def test_a_fit_whose_model_overflows_fails_diverged_and_is_never_served(
    make_client: Factory,
) -> None:
    client = make_client()
    good = fit_and_wait(client)
    served = client.get("/predict", params={"hours": 1}).json()
    # w = 2.1e156 after the 68th update: the history is finite, the mse is not
    blown = fit_and_wait(client, x=[1], y=[0], learning_rate=100, epochs=68)
    assert blown["status"] == "failed"
    assert blown["result"] is None
    assert blown["error"]["type"] == "diverged"
    assert blown["error"]["epoch"] == 68
    assert "learning_rate" in blown["error"]["detail"]
    assert client.get("/predict", params={"hours": 1}).json() == served
    assert client.get("/model").json()["job_id"] == good["id"]
    for job in client.get("/jobs").json()["jobs"]:
        no_null_numbers(job)
    history = no_nan(client.get("/history", params={"job_id": blown["id"]}).text)
    assert None not in history["w"] + history["loss"]


@pytest.mark.parametrize(
    ("body", "figure"),
    [
        ({"x": [1], "y": [2], "epochs": 1_000_000, "batch_size": 1_000_000}, "1,000,000,000,000"),
        ({"x": [1.0] * 1000, "y": [2.0] * 1000, "epochs": 200, "batch_size": None}, "200,000"),
    ],
)
def test_the_work_of_one_fit_is_bounded(
    make_client: Factory, body: dict[str, Any], figure: str
) -> None:
    client = make_client(max_sample_steps=100_000)
    before = state(client)
    problem = assert_problem(client.post("/fit", json=body), 422, "validation-error")
    [issue] = problem["errors"]
    assert issue["field"] == "epochs"
    assert figure in issue["message"]
    assert "SGD_MAX_SAMPLE_STEPS=100,000" in issue["message"]
    assert state(client) == before
    # just within the limit is accepted
    assert client.post("/fit", json={**TUTORIAL, "epochs": 100_000}).status_code == 202


def test_the_default_work_limit_refuses_hours_of_work_and_is_in_openapi(
    make_client: Factory,
) -> None:
    client = make_client(max_sample_steps=10_000_000_000)  # the default, stated
    r = client.post("/fit", json={"x": [1], "y": [2], "epochs": 1_000_000, "batch_size": 1_000_000})
    assert_problem(r, 422, "validation-error")
    spec = client.get("/openapi.json").json()
    fit_schema = spec["components"]["schemas"]["FitRequest"]
    assert fit_schema["x-max-sample-steps"] == 10_000_000_000
    assert "SGD_MAX_SAMPLE_STEPS=10000000000" in fit_schema["properties"]["epochs"]["description"]


# -- model versions and rollback -----------------------------------------------------------


def test_every_version_is_kept_and_a_rollback_serves_an_older_one(make_client: Factory) -> None:
    client = make_client(api_token="s3cret")
    client.headers["Authorization"] = "Bearer s3cret"
    w = [fit_and_wait(client, init_w=float(i), epochs=1 + i, seed=i)["result"] for i in range(3)]
    assert [r["model_version"] for r in w] == [1, 2, 3]
    listed = client.get("/models").json()
    assert listed["served_version"] == 3
    assert [v["version"] for v in listed["versions"]] == [3, 2, 1]
    assert [v["served"] for v in listed["versions"]] == [True, False, False]
    one = client.get("/models/1").json()
    assert (one["w"], one["served"]) == (w[0]["w"], False)
    first = w[0]
    assert one["metrics"] == {
        "final_loss": first["final_loss"],
        "mse": first["mse"],
        "train_mse": first["mse"],  # no split: every row is a training row
        "train_r2": first["train_r2"],
        "val_mse": None,
        "val_r2": None,
    }
    assert client.get("/models", params={"limit": 1}).json()["versions"][0]["version"] == 3
    # a kept version answers without being served
    old = client.get("/predict", params={"hours": 4, "version": 1}).json()
    assert (old["model_version"], old["score"]) == (1, w[0]["w"] * 4)
    many = client.post("/predict", json={"hours": [1, 2], "version": 2}).json()
    assert (many["model_version"], many["scores"]) == (2, [w[1]["w"], w[1]["w"] * 2])
    assert client.get("/predict", params={"hours": 4}).json()["model_version"] == 3
    # the rollback: a write, so it needs the token
    assert_problem(
        client.post("/models/1/serve", headers={"Authorization": ""}), 401, "unauthorized"
    )
    served = client.post("/models/1/serve")
    assert served.status_code == 200
    assert (served.json()["version"], served.json()["served"]) == (1, True)
    assert client.get("/model").json()["version"] == 1
    assert client.get("/predict", params={"hours": 4}).json() == old
    assert client.get("/models").json()["served_version"] == 1
    # the next fit is the next version, not the served one's successor
    assert fit_and_wait(client)["result"]["model_version"] == 4


def test_unknown_versions_are_404_and_change_nothing(make_client: Factory) -> None:
    client = make_client()
    fit_and_wait(client)
    before = client.get("/model").json()
    for r in (
        client.get("/models/7"),
        client.post("/models/7/serve"),
        client.get("/predict", params={"hours": 4, "version": 7}),
        client.post("/predict", json={"hours": [4], "version": 7}),
    ):
        assert_problem(r, 404, "version-not-found")
    assert_problem(
        client.get("/predict", params={"hours": 4, "version": 0}), 422, "validation-error"
    )
    assert client.get("/model").json() == before


def test_the_oldest_versions_are_evicted(make_client: Factory) -> None:
    client = make_client(keep_versions=2)
    for seed in range(3):
        fit_and_wait(client, seed=seed)
    assert [v["version"] for v in client.get("/models").json()["versions"]] == [3, 2]
    assert_problem(client.get("/models/1"), 404, "version-not-found")
    assert client.post("/models/2/serve").status_code == 200  # a rollback to the oldest kept
    fit_and_wait(client, seed=9)  # version 4 is published and served
    assert [v["version"] for v in client.get("/models").json()["versions"]] == [4, 3]
