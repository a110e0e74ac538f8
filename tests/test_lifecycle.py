"""Fits that check themselves: validation splits, early stopping, publication rules and warm
starts, through HTTP on both stores; and the exact, never-negative losses behind them."""

import math
import random
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.core import engine as training
from service.core.schemas import Quadratic
from tests.conftest import TUTORIAL, Server, wait_job
from tests.test_api import Factory, assert_problem, fit, fit_and_wait, no_nan

# 40 noisy rows around y = 3x + 1: a split has something to measure.
_rng = random.Random(7)
NOISY_X = [_rng.uniform(-2, 2) for _ in range(40)]
NOISY = {"x": NOISY_X, "y": [3 * v + 1 + _rng.gauss(0, 0.3) for v in NOISY_X]}


def history(client: TestClient | httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get("/history", params={"job_id": job_id, "max_points": 1_000_000})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = no_nan(r.text)
    return body


def held_out(body: dict[str, Any], seed: int) -> tuple[list[float], list[float], list[int]]:
    """The rows a fit with this body and seed holds out, and the indices of the others."""
    x, y = training.as_tensor(body["x"]), training.as_tensor(body["y"])
    _, _, vx, vy = training.split(x, y, body["validation_fraction"], seed)
    assert vx is not None
    assert vy is not None
    held = {(a, b) for a, b in zip(vx.tolist(), vy.tolist(), strict=True)}
    train = [i for i, row in enumerate(zip(body["x"], body["y"], strict=True)) if row not in held]
    return vx.tolist(), vy.tolist(), train


def mse(x: list[float], y: list[float], w: float, b: float) -> float:
    return math.fsum((w * u + b - v) ** 2 for u, v in zip(x, y, strict=True)) / len(x)


def test_the_defaults_keep_todays_fit(client: TestClient) -> None:
    job = fit_and_wait(client, seed=1)
    result = job["result"]
    assert (result["epochs_run"], result["stopped_early"], result["published"]) == (
        100,
        False,
        True,
    )
    assert result["not_published_because"] is None
    assert (result["val_mse"], result["val_r2"]) == (None, None)
    assert result["train_mse"] == result["mse"]
    assert history(client, job["id"])["val_loss"] is None
    assert client.get("/model").json()["version"] == result["model_version"]


def test_a_split_is_held_out_never_trained_on_and_its_loss_exact(client: TestClient) -> None:
    body = {**NOISY, "validation_fraction": 0.25, "fit_intercept": True, "epochs": 400}
    job = fit_and_wait(client, **body, seed=5, learning_rate=0.05)
    assert job["status"] == "succeeded", job
    vx, vy, train = held_out(body, 5)
    assert len(vx) == 10  # ceil(0.25 * 40)
    hist = history(client, job["id"])
    assert len(hist["val_loss"]) == hist["total_epochs"] == 400
    # exact at every epoch: the validation MSE of the parameters before each update
    for w, b, val in zip(hist["w"], hist["b"], hist["val_loss"], strict=True):
        assert val >= 0
        assert val == pytest.approx(mse(vx, vy, w, b), rel=1e-9, abs=1e-12)
    result = job["result"]
    tx, ty = [NOISY["x"][i] for i in train], [NOISY["y"][i] for i in train]
    assert result["val_mse"] == pytest.approx(mse(vx, vy, result["w"], result["b"]), rel=1e-12)
    assert result["train_mse"] == pytest.approx(mse(tx, ty, result["w"], result["b"]), rel=1e-12)
    mean = math.fsum(vy) / len(vy)
    var = math.fsum((v - mean) ** 2 for v in vy) / len(vy)
    assert result["val_r2"] == pytest.approx(1 - result["val_mse"] / var, rel=1e-12)
    assert 0.9 < result["train_r2"] <= 1
    # never trained on: the same fit of the training rows alone walks the same path
    alone = fit_and_wait(
        client, x=tx, y=ty, fit_intercept=True, epochs=400, seed=5, learning_rate=0.05
    )
    assert history(client, alone["id"])["w"] == hist["w"]
    metrics = client.get(f"/models/{result['model_version']}").json()["metrics"]
    assert metrics["val_mse"] == result["val_mse"]
    assert metrics["val_r2"] == result["val_r2"]


def test_the_validation_loss_stays_exact_and_non_negative_at_convergence(
    client: TestClient,
) -> None:
    # y = 2x exactly: the loss goes to 0, where an expansion that cancels would go below it
    x = [float(i % 7 + 1) for i in range(30)]
    body = {"x": x, "y": [2 * v for v in x], "validation_fraction": 0.3}
    job = fit_and_wait(client, **body, epochs=3000, batch_size=None, seed=2)
    hist = history(client, job["id"])
    assert min(hist["val_loss"]) >= 0
    assert hist["val_loss"][-1] < 1e-20
    assert job["result"]["val_mse"] < 1e-20


def sklearn_stop(losses: list[float], tol: float, patience: int) -> int | None:
    """scikit-learn's rule over monitored losses: the index of the epoch it stops after."""
    best, count = math.inf, 0
    for i, loss in enumerate(losses):
        count = count + 1 if loss > best - tol else 0
        best = min(best, loss)
        if count >= patience:
            return i
    return None


def test_early_stopping_on_the_training_loss(client: TestClient) -> None:
    job = fit_and_wait(client, epochs=20_000, tol=1e-4, n_iter_no_change=5, seed=3)
    result = job["result"]
    assert job["status"] == "succeeded"
    assert result["stopped_early"] is True
    hist = history(client, job["id"])
    run = result["epochs_run"]
    assert 5 <= run < 20_000
    assert hist["total_epochs"] == job["progress"]["epoch"] == run
    # the training MSE (every row: no split) before each update, by the rule, stops right there
    monitored = [mse(TUTORIAL["x"], TUTORIAL["y"], w, 0.0) for w in hist["w"]]
    assert sklearn_stop(monitored, 1e-4, 5) == run - 1
    assert abs(result["w"] - 2) < 0.05


def test_early_stopping_on_the_validation_loss(client: TestClient) -> None:
    body = {**NOISY, "validation_fraction": 0.2, "fit_intercept": True}
    job = fit_and_wait(client, **body, epochs=50_000, tol=1e-3, n_iter_no_change=10, seed=4)
    result = job["result"]
    assert result["stopped_early"] is True
    hist = history(client, job["id"])
    assert sklearn_stop(hist["val_loss"], 1e-3, 10) == result["epochs_run"] - 1
    assert len(hist["val_loss"]) == result["epochs_run"]


def test_publish_never_keeps_the_version_unserved_until_promoted(make_client: Factory) -> None:
    client = make_client()
    first = fit_and_wait(client, seed=1)["result"]
    kept = fit_and_wait(client, seed=2, publish="never")["result"]
    assert kept["published"] is False
    assert "never" in kept["not_published_because"]
    assert client.get("/model").json()["version"] == first["model_version"]
    listed = client.get("/models").json()
    assert listed["served_version"] == first["model_version"]
    assert [v["served"] for v in listed["versions"]] == [False, True]
    r = client.post(f"/models/{kept['model_version']}/serve")
    assert r.status_code == 200, r.text
    assert client.get("/predict", params={"hours": 4}).json()["model_version"] == 2


def test_publish_if_better_compares_on_the_same_held_out_rows(make_client: Factory) -> None:
    client = make_client()
    split = {**NOISY, "validation_fraction": 0.3, "fit_intercept": True, "publish": "if_better"}
    # nothing served yet: published (full-batch descent, stopped well short of the optimum)
    full = {**split, "batch_size": None, "learning_rate": 0.05, "seed": 9}
    good = fit_and_wait(client, **full, epochs=15)["result"]
    assert good["published"] is True
    # one update from far away: worse on the same rows, kept but not served
    bad = fit_and_wait(client, **split, epochs=1, init_w=-50.0, seed=9)["result"]
    assert bad["published"] is False
    assert "is not lower than that of the served version 1" in bad["not_published_because"]
    assert client.get("/model").json()["version"] == good["model_version"]
    assert client.get(f"/models/{bad['model_version']}").json()["served"] is False
    # better on the same rows: served
    better = fit_and_wait(client, **full, epochs=5000)["result"]
    vx, vy, _ = held_out(split, 9)
    assert mse(vx, vy, better["w"], better["b"]) < mse(vx, vy, good["w"], good["b"])
    assert better["published"] is True
    assert client.get("/model").json()["version"] == better["model_version"]


def test_a_warm_start_begins_where_a_model_ended(make_client: Factory) -> None:
    client = make_client()
    first = fit_and_wait(client, **NOISY, fit_intercept=True, epochs=50, seed=1)["result"]
    warm = fit_and_wait(client, **NOISY, fit_intercept=True, epochs=10, init_from="served")
    params = warm["params"]
    assert (params["init_from"], params["init_w"], params["init_b"]) == (
        first["model_version"],
        first["w"],
        first["b"],
    )
    hist = history(client, warm["id"])
    assert (hist["w"][0], hist["b"][0]) == (first["w"], first["b"])
    by_number = fit(client, **NOISY, fit_intercept=True, epochs=10, init_from=1)
    assert by_number["params"]["init_from"] == 1
    # kept versions only, and a served one only when one is
    assert_problem(
        client.post("/fit", json={**TUTORIAL, "init_from": 99}), 404, "version-not-found"
    )
    fresh = make_client()
    r = fresh.post("/fit", json={**TUTORIAL, "init_from": "served"})
    assert_problem(r, 409, "nothing-served")
    # a model with b cannot start a fit without one
    r = client.post("/fit", json={**TUTORIAL, "init_from": 1})
    problem = assert_problem(r, 422, "validation-error")
    assert problem["errors"][0]["field"] == "init_from, fit_intercept"


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ({"publish": "if_better"}, "publish, validation_fraction"),
        ({"n_iter_no_change": 3}, "n_iter_no_change, tol"),
        ({"init_from": "served", "init_w": 2.0}, "init_from, init_w"),
        ({"x": [1.0], "y": [2.0], "validation_fraction": 0.5}, "validation_fraction, x"),
    ],
)
def test_options_that_do_not_go_together_are_422_naming_them(
    client: TestClient, extra: dict[str, Any], fields: str
) -> None:
    def job_ids() -> list[str]:  # the shared client's other jobs may still be running
        return [job["id"] for job in client.get("/jobs").json()["jobs"]]

    before = job_ids()
    r = client.post("/fit", json={**TUTORIAL, **extra})
    problem = assert_problem(r, 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == [fields]
    assert fields in problem["detail"]
    assert job_ids() == before  # no job made


def test_every_default_stated_explicitly_is_accepted(client: TestClient) -> None:
    """A generated client may send the whole body: its defaults never clash."""
    defaults = {
        "validation_fraction": 0.0,
        "tol": None,
        "n_iter_no_change": 5,
        "publish": "always",
        "init_from": None,
        "init_w": 1.0,
    }
    r = client.post("/fit", json={**TUTORIAL, **defaults})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"validation_fraction": 0.6},
        {"validation_fraction": -0.1},
        {"tol": -1.0},
        {"n_iter_no_change": 0, "tol": 0.1},
        {"publish": "sometimes"},
        {"init_from": "latest"},
        {"init_from": 0},
        {"init_from": True},
    ],
)
def test_out_of_range_options_are_422(client: TestClient, extra: dict[str, Any]) -> None:
    problem = assert_problem(
        client.post("/fit", json={**TUTORIAL, **extra}), 422, "validation-error"
    )
    assert {e["field"] for e in problem["errors"]} & set(extra)


@pytest.mark.timeout(180)
def test_lifecycle_options_end_to_end(shared_server: Server) -> None:
    """Through a real server on a free port: split, early stop, publish never, warm start."""
    with httpx.Client(base_url=shared_server.url, timeout=30) as http:
        first = http.post("/fit", json={**TUTORIAL, "seed": 1})
        one = wait_job(http, first.json()["id"])
        body = {
            **NOISY,
            "fit_intercept": True,
            "validation_fraction": 0.2,
            "tol": 1e-6,
            "n_iter_no_change": 3,
            "publish": "never",
            "epochs": 100_000,
            "init_from": "served",
        }
        r = http.post("/fit", json=body)
        assert r.status_code == 202, r.text
        job = wait_job(http, r.json()["id"])
        result = job["result"]
        assert job["params"]["init_from"] == one["result"]["model_version"]
        assert result["stopped_early"] is True
        assert result["published"] is False
        assert result["val_mse"] is not None
        assert http.get("/model").json()["version"] == one["result"]["model_version"]
        hist = history(http, job["id"])
        assert len(hist["val_loss"]) == result["epochs_run"]


# -- the quadratic form: exact, and never below zero -----------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_the_quadratic_equals_the_mse_of_the_rows(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 1 + seed * 7
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (seed % 5)
    if seed % 4 == 0:
        x = torch.full_like(x, 3.0)  # constant x: var_x is 0
    y = 2 * x - 1 + torch.randn(n, generator=gen, dtype=torch.float64)
    q = training.quadratic(x, y)
    ws = torch.randn(50, generator=gen, dtype=torch.float64) * 5
    bs = torch.randn(50, generator=gen, dtype=torch.float64) * 5
    column = training.losses(q, training._to_array(ws), training._to_array(bs))
    for w, b, loss in zip(ws.tolist(), bs.tolist(), column, strict=True):
        direct = training.mse(x, y, w, b)
        assert loss == pytest.approx(direct, rel=1e-9, abs=1e-9)
        assert q.mse(w, b) == pytest.approx(direct, rel=1e-9, abs=1e-9)
        assert loss >= 0


def test_the_quadratic_has_no_nan_at_the_extremes() -> None:
    q = Quadratic(w_opt=0.0, b_opt=1e200, loss_opt=0.0, mean_x=1.0, var_x=0.0, var_y=0.0)
    assert q.mse(1e200, 0.0) == 0.0  # dw * dw overflows, but var_x is 0
    assert q.r2(1.0, 1.0) is None
