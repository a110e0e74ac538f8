"""Hypothesis properties of the engine and the API."""

import json
import math
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.core import engine as training
from service.core.errors import Diverged
from tests.conftest import TUTORIAL, wait_job

finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)


@st.composite
def well_conditioned(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    """Spread-out x (so the normal equations are well conditioned) and a noisy line."""
    n = draw(st.integers(min_value=3, max_value=40))
    xs = sorted(draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n, unique=True)))
    w = draw(st.floats(-5, 5))
    b = draw(st.floats(-5, 5))
    noise = draw(st.lists(st.floats(-0.5, 0.5), min_size=n, max_size=n))
    return xs, [w * x + b + e for x, e in zip(xs, noise, strict=True)]


def lstsq(x: list[float], y: list[float]) -> tuple[float, float]:
    xt = torch.tensor(x, dtype=torch.float64)
    design = torch.stack([xt, torch.ones_like(xt)], dim=1)
    sol = torch.linalg.lstsq(design, torch.tensor(y, dtype=torch.float64)[:, None]).solution
    return float(sol[0, 0]), float(sol[1, 0])


@settings(max_examples=25, deadline=None)
@given(data=well_conditioned())
def test_full_batch_fits_approach_least_squares(data: tuple[list[float], list[float]]) -> None:
    x, y = data
    xt, yt = training.as_tensor(x), training.as_tensor(y)
    spread = float(((xt - xt.mean()) ** 2).mean())
    if spread < 0.05:  # nearly constant x: not well conditioned, nothing to claim
        return
    # a step size under 1/L (L = 2·max eigenvalue of the covariance) converges from any start
    top = float(
        torch.linalg.eigvalsh(
            torch.tensor(
                [[float((xt * xt).mean()), float(xt.mean())], [float(xt.mean()), 1.0]],
                dtype=torch.float64,
            )
        )[-1]
    )
    params = training.FitParams(
        epochs=20_000,
        learning_rate=0.5 / top,
        init_w=0.0,
        batch_size=None,
        fit_intercept=True,
        seed=0,
    )
    *_, last = training.train(xt, yt, params)
    w, b = lstsq(x, y)
    assert abs(last.w_after - w) <= 1e-6 * max(1.0, abs(w))
    assert abs(last.b_after - b) <= 1e-6 * max(1.0, abs(b))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hours=st.lists(finite, min_size=1, max_size=20))
def test_predictions_equal_w_h_plus_b(client: TestClient, hours: list[float]) -> None:
    model = client.get("/model").json()
    if "version" not in model:
        wait_job(client, client.post("/fit", json=TUTORIAL).json()["id"])
        model = client.get("/model").json()
    many = client.post("/predict", json={"hours": hours}).json()
    if many["model_version"] != model["version"]:
        return  # another test published meanwhile; nothing to compare
    assert many["scores"] == [model["w"] * h + model["b"] for h in hours]
    one = client.get("/predict", params={"hours": repr(hours[0])}).json()
    assert one["score"] == model["w"] * hours[0] + model["b"]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bad_bodies = st.one_of(
    st.fixed_dictionaries({"x": json_values, "y": json_values}),
    st.dictionaries(
        st.sampled_from(["x", "y", "epochs", "learning_rate", "batch_size", "seed", "junk"]),
        json_values,
    ),
    json_values,
    st.binary(max_size=40),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bad_bodies)
def test_a_rejected_request_never_changes_the_served_model(client: TestClient, body: Any) -> None:
    if client.get("/model").status_code != 200:
        wait_job(client, client.post("/fit", json=TUTORIAL).json()["id"])
    before = client.get("/model").json()
    if isinstance(body, bytes):
        r = client.post("/fit", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(
            "/fit", content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert r.status_code < 500
    # no number in the answer is NaN or infinite (a key the caller named "NaN" may be echoed)
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in {r.text}"))
    if r.status_code == 202:  # hypothesis found a valid fit: let it end, then move on
        wait_job(client, r.json()["id"])
        return
    assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/model").json() == before


# -- numbers a caller can trust (issue 11) ---------------------------------------------------


@st.composite
def any_fit(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, training.FitParams]:
    """Random data and hyper-parameters, from tame to explosive."""
    n = draw(st.integers(min_value=1, max_value=12))
    values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    x = draw(st.lists(values, min_size=n, max_size=n).filter(any))
    y = draw(st.lists(values, min_size=n, max_size=n))
    params = training.FitParams(
        epochs=draw(st.integers(1, 3000)),
        learning_rate=draw(st.floats(1e-6, 1e3)),
        init_w=draw(st.floats(-1e3, 1e3)),
        batch_size=draw(st.sampled_from([1, 2, 5, None])),
        fit_intercept=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32)),
    )
    return training.as_tensor(x), training.as_tensor(y), params


@settings(max_examples=150, deadline=None)
@given(fit=any_fit(), engine=st.sampled_from(training.ENGINES))
def test_a_fit_either_diverges_or_reports_only_finite_numbers(
    fit: tuple[torch.Tensor, torch.Tensor, training.FitParams], engine: training.Engine
) -> None:
    x, y, params = fit
    chunks: list[training.Chunk] = []
    bad: Diverged | None = None
    try:
        chunks.extend(training.train(x, y, params, engine))
        outcome = training.result(x, y, chunks[-1], params)
    except Diverged as exc:
        bad = exc
    if bad is not None:
        assert 0 <= bad.epoch <= params.epochs
        recorded = sum(len(c) for c in chunks)
        assert recorded <= bad.epoch  # nothing at or after the bad epoch is recorded
    else:
        numbers = (outcome.w, outcome.b, outcome.final_loss, outcome.mse)
        assert all(map(math.isfinite, numbers))
        assert outcome.final_loss >= 0
        assert outcome.mse >= 0
    for column in training.history(chunks):
        assert all(map(math.isfinite, column))
    assert all(v >= 0 for c in chunks for v in c.loss)


@st.composite
def exact_line(draw: st.DrawFn) -> tuple[list[float], list[float], training.FitParams]:
    """Data on an exact line, full batch with an intercept: the loss runs down towards 0."""
    n = draw(st.integers(min_value=1, max_value=8))
    x = draw(st.lists(st.floats(-10, 10).filter(lambda v: abs(v) > 1e-3), min_size=n, max_size=n))
    w, b = draw(st.floats(-10, 10)), draw(st.floats(-20, 20))
    params = training.FitParams(
        epochs=500,
        learning_rate=draw(st.sampled_from([1e-3, 3e-3, 1e-2])),
        init_w=draw(st.floats(-5, 5)),
        batch_size=None,
        fit_intercept=draw(st.booleans()),
        seed=0,
    )
    return x, [w * v + b for v in x], params


# 300 full-batch fits against the eager reference: ~40 s on a quiet machine, past the suite's
# 120 s limit with both cores busy (it failed so twice); still bounded, so a hang fails here.
@pytest.mark.timeout(400)
@settings(max_examples=300, deadline=None)
@given(case=exact_line())
# found by Hypothesis: a first loss of 1.4e-14; a loss of 0 from the start, b moving by 3e-16
@example(
    case=(
        [2.0],
        [2.0000001192092896],
        training.FitParams(epochs=500, learning_rate=0.003, init_w=1.0, batch_size=None),
    )
)
@example(
    case=(
        [3.0],
        [4.5],
        training.FitParams(
            epochs=500, learning_rate=0.003, init_w=1.5, batch_size=None, fit_intercept=True
        ),
    )
)
def test_full_batch_losses_are_never_negative_and_match_the_reference(
    case: tuple[list[float], list[float], training.FitParams],
) -> None:
    x, y, params = case
    xt, yt = training.as_tensor(x), training.as_tensor(y)
    try:
        fast = training.history(training.train(xt, yt, params))
        ref = training.history(training.train(xt, yt, params, "eager"))
    except Diverged:
        return  # too large a step for this data: the guard's business, not this test's
    assert min(fast[2]) >= 0
    # The standard of the trajectories: relative to the largest (the first epoch's) loss, or
    # 1e-18 absolute, for a fit that starts on the line (a first loss of 1e-14, where the two
    # engines' rounding, 1e-22, is already 1e-8 of it).
    for col_fast, col_ref in zip(fast, ref, strict=True):
        diff = max((abs(u - v) for u, v in zip(col_fast, col_ref, strict=True)), default=0.0)
        assert training.rel_diff(col_fast, col_ref) < 1e-9 or diff <= 1e-18
