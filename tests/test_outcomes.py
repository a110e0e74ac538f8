"""Learning from what happened, through real servers on both stores: prediction ids, recorded
outcomes and the live quality they give each version, canary rollouts split by a caller's key,
the rule that promotes or rolls back a canary, and continuous training following a drift.

The store's own arithmetic and atomicity are tests/test_outcomes_store.py's.
"""

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import STORES, Fleet, Server, store_env, wait_job, wait_until

pytestmark = pytest.mark.timeout(180)

X = [float(v) for v in range(1, 21)]
TUTORIAL = {"x": X, "y": [2 * x for x in X], "epochs": 400, "learning_rate": 0.001, "seed": 1}
PREDICTION_ID = re.compile(r"v(\d+)-[0-9a-f]{16}")


def fit(http: httpx.Client, **body: Any) -> int:
    """A fit of y = slope x (default 2), published as `publish` says; its version."""
    slope = body.pop("slope", 2.0)
    job = http.post("/fit", json={**TUTORIAL, "y": [slope * x for x in X], **body}).json()
    done = wait_job(http, job["id"])
    assert done["status"] == "succeeded", done
    return int(done["result"]["model_version"])


def version_of(answer: httpx.Response) -> int:
    """The version an answer names, in its body and in its prediction id (the same)."""
    assert answer.status_code == 200, answer.text
    match = PREDICTION_ID.fullmatch(answer.headers["x-prediction-id"])
    assert match is not None, answer.headers
    version = int(match.group(1))
    assert version == answer.json()["model_version"]
    return version


@pytest.fixture(params=STORES)
def make(
    request: pytest.FixtureRequest, make_server: Callable[..., Server]
) -> Callable[..., Server]:
    """Servers of the test's own on each store, with SGD_* overrides."""

    def start(**env: str) -> Server:
        return make_server(**store_env(request, request.param), **env)

    return start


def test_every_prediction_names_its_version(make: Callable[..., Server]) -> None:
    srv = make()
    with srv.client() as http:
        v1 = fit(http)
        answers = [
            http.get("/predict", params={"hours": 4}),
            http.post("/predict", json={"hours": [1, 2]}),
            http.post("/v2/models/sgd/infer", json={"inputs": [_hours([4.0])]}),
        ]
        ids = {a.headers["x-prediction-id"] for a in answers}
        assert len(ids) == 3  # one per answer
        for answer in answers[:2]:
            assert version_of(answer) == v1
        assert answers[2].headers["x-prediction-id"].startswith(f"v{v1}-")


def _hours(values: list[float]) -> dict[str, Any]:
    return {"name": "hours", "shape": [len(values)], "datatype": "FP64", "data": values}


def test_outcomes_give_each_version_its_live_quality(make: Callable[..., Server]) -> None:
    srv = make()
    with srv.client() as http:
        v1 = fit(http)
        model = http.get(f"/models/{v1}").json()
        assert model["quality"] is None
        answer = http.get("/predict", params={"hours": 4})
        # what really happened: 1 more than predicted, then 3 less
        score = answer.json()["score"]
        pid = answer.headers["x-prediction-id"]
        receipt = http.post(
            "/outcomes",
            json={"hours": [4, 4], "score": [score + 1, score - 3], "prediction_id": pid},
        )
        assert receipt.status_code == 200, receipt.text
        assert receipt.json() == {
            "recorded": 2,
            "kept": 2,
            "total": 2,
            "versions": [v1],
            "decision": None,
            "retrain_job": None,
        }
        quality = http.get(f"/models/{v1}").json()["quality"]
        assert quality["outcomes"] == 2
        assert quality["mae"] == pytest.approx(2.0)
        assert quality["rmse"] == pytest.approx(math.sqrt(5.0))
        assert quality["coverage"] is not None  # a gaussian interval: every fit has one
        listed = http.get("/models").json()["versions"][0]["quality"]
        assert listed == quality
        metrics = http.get("/metrics").text
        assert f'sgd_live_mae{{version="{v1}"}} 2.0' in metrics
        assert f'sgd_live_outcomes{{version="{v1}"}} 2.0' in metrics


BAD_OUTCOMES = [
    ({"hours": [1, 2], "score": [2]}, 422, "hours, score"),
    ({"hours": [1], "score": ["2"]}, 422, "score"),
    ({"hours": [], "score": []}, 422, "hours"),
    ({"hours": [1e300], "score": [2]}, 422, "hours[0]"),
    ({"hours": [1], "score": [2], "prediction_id": "nope"}, 422, "prediction_id"),
    (
        {"hours": [1], "score": [2], "model_version": 1, "prediction_id": "v1-0123456789abcdef"},
        422,
        "prediction_id, model_version",
    ),
    ({"hours": [1], "score": [2], "model_version": 99}, 404, None),
    ({"hours": [1], "score": [2], "prediction_id": "v99-0123456789abcdef"}, 404, None),
    ({"hours": [1], "score": [2], "extra": 1}, 422, "extra"),
]


def test_bad_outcomes_are_refused_and_change_nothing(make: Callable[..., Server]) -> None:
    srv = make(SGD_MAX_ABS_VALUE="1e6")
    with srv.client() as http:
        v1 = fit(http)
        for body, status, field in BAD_OUTCOMES:
            r = http.post("/outcomes", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert problem["detail"]
            if field is not None:
                named = [
                    e.get("field") or ".".join(map(str, e.get("loc", [])))
                    for e in problem["errors"]
                ]
                assert any(field in n for n in named), (body, problem)
        r = http.post("/outcomes", content=b"[1,2", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert http.get(f"/models/{v1}").json()["quality"] is None
        ok = http.post("/outcomes", json={"hours": [1], "score": [2]}).json()
        assert (ok["recorded"], ok["total"]) == (1, 1)  # nothing refused was kept


def test_a_canary_splits_predictions_by_key(make: Callable[..., Server]) -> None:
    srv = make()
    with srv.client() as http:
        v1 = fit(http)
        v2 = fit(http, slope=2.5, publish="never")
        started = http.post(f"/models/{v2}/serve", json={"traffic": 10})
        assert started.status_code == 200, started.text
        assert started.json()["rollout"]["state"] == "running"
        assert http.get("/models").json()["canary"]["version"] == v2
        # at random: 10% +- 4.5 binomial standard deviations (30 of 10,000)
        counts = Counter(
            version_of(http.get("/predict", params={"hours": 1})) for _ in range(10_000)
        )
        assert set(counts) == {v1, v2}
        assert abs(counts[v2] - 1000) <= 135, counts
        # by key: one key, one version, on every route; the same share of keys
        seen = {}
        for i in range(400):
            key = f"caller-{i}"
            versions = {
                version_of(http.get("/predict", params={"hours": 1, "key": key})),
                version_of(
                    http.get("/predict", params={"hours": 1}, headers={"x-caller-key": key})
                ),
                version_of(
                    http.post("/predict", json={"hours": [1]}, headers={"x-caller-key": key})
                ),
            }
            assert len(versions) == 1, (key, versions)
            seen[key] = versions.pop()
        assert 10 <= sum(v == v2 for v in seen.values()) <= 75  # 40 expected of 400
        # ?version= is not split
        assert {
            version_of(http.get("/predict", params={"hours": 1, "version": v1})) for _ in range(50)
        } == {v1}


def test_rollouts_refused_change_nothing(make: Callable[..., Server]) -> None:
    srv = make()
    with srv.client() as http:
        v1 = fit(http)
        v2 = fit(http, slope=2.1, publish="never")
        v3 = fit(http, slope=2.2, publish="never")
        cases = [
            (f"/models/{v1}/serve", {"traffic": 10}, 409),  # served already
            (f"/models/{v2}/serve", {"traffic": 101}, 422),
            (f"/models/{v2}/serve", {"traffic": "10"}, 422),
            (f"/models/{v2}/serve", {"traffic": 100, "promote_after": 5}, 422),
            (f"/models/{v2}/serve", {"trafic": 10}, 422),
            ("/models/99/serve", {"traffic": 10}, 404),
        ]
        for path, body, status in cases:
            r = http.post(path, json=body)
            assert (r.status_code, r.headers["content-type"]) == (
                status,
                "application/problem+json",
            ), (body, r.text)
        assert http.get("/models").json()["canary"] is None
        assert http.post(f"/models/{v2}/serve", json={"traffic": 20}).status_code == 200
        second = http.post(f"/models/{v3}/serve", json={"traffic": 20})
        assert (second.status_code, second.json()["type"]) == (409, "rollout-conflict")
        by_hand = http.post(f"/models/{v3}/serve")
        assert (by_hand.status_code, by_hand.json()["type"]) == (409, "rollout-conflict")
        wrong = http.delete(f"/models/{v3}/serve")
        assert (wrong.status_code, wrong.json()["type"]) == (409, "rollout-conflict")
        models = http.get("/models").json()
        assert (models["served_version"], models["canary"]["version"]) == (v1, v2)
        back = http.delete(f"/models/{v2}/serve")
        assert back.status_code == 200
        assert back.json()["rollout"]["state"] == "rolled_back"
        assert http.get("/models").json()["canary"] is None
        assert {version_of(http.get("/predict", params={"hours": 1})) for _ in range(50)} == {v1}


def test_the_rule_rolls_back_a_worse_canary_and_promotes_a_better_one(
    make: Callable[..., Server],
) -> None:
    srv = make()
    truth = [3 * x for x in X]  # what really happens: y = 3x
    with srv.client() as http:
        v1 = fit(http)  # y = 2x
        worse = fit(http, slope=1.0, publish="never")
        rule = {"promote_after": 40, "max_worse": 0.05}
        assert http.post(f"/models/{worse}/serve", json={"traffic": 50, **rule}).status_code == 200
        first = http.post("/outcomes", json={"hours": X, "score": truth}).json()
        assert first["decision"] is None
        assert sorted(first["versions"]) == [v1, worse]
        decided = http.post("/outcomes", json={"hours": X, "score": truth}).json()["decision"]
        assert decided["state"] == "rolled_back"
        assert decided["outcomes"] == 40
        assert decided["mae"] > decided["stable_mae"]
        assert "worse by more than max_worse" in decided["reason"]
        assert http.get(f"/models/{worse}").json()["rollout"] == decided
        assert http.get("/models").json()["served_version"] == v1

        better = fit(http, slope=3.0, publish="never")
        assert http.post(f"/models/{better}/serve", json={"traffic": 10, **rule}).status_code == 200
        http.post("/outcomes", json={"hours": X, "score": truth})
        decided = http.post("/outcomes", json={"hours": X, "score": truth}).json()["decision"]
        assert decided["state"] == "promoted"
        assert decided["mae"] < decided["stable_mae"]
        models = http.get("/models").json()
        assert (models["served_version"], models["canary"]) == (better, None)
        assert {version_of(http.get("/predict", params={"hours": 1})) for _ in range(20)} == {
            better
        }
    log = srv.log()
    assert f"canary of version {worse} rolled back: MAE" in log
    assert f"canary of version {better} promoted: MAE" in log


def test_continuous_training_follows_a_drift(make: Callable[..., Server]) -> None:
    """y = 2x, then y = 3x: each batch of 40 outcomes starts a fit on the last 40, rolled out
    as a 10% canary; the one fitted on the drifted relation is promoted by the rule."""
    srv = make(
        SGD_RETRAIN_AFTER="40",
        SGD_RETRAIN_ROWS="40",
        SGD_RETRAIN_EPOCHS="400",
        SGD_RETRAIN_PROMOTE_AFTER="40",
    )
    with srv.client() as http:
        v1 = fit(http, learning_rate=0.001)
        steady = http.post(
            "/outcomes", json={"hours": X * 2, "score": [2 * x for x in X] * 2}
        ).json()
        assert steady["retrain_job"] is not None  # 40 outcomes: a fit on them
        job = wait_job(http, steady["retrain_job"])
        assert job["params"]["init_from"] == v1
        assert job["params"]["publish"] == "canary"
        v2 = job["result"]["model_version"]
        mae_before = http.get(f"/models/{v1}").json()["quality"]["mae"]
        assert mae_before < 0.5

        # the relation drifts: y = 3x; the old canary (y = 2x, as v1) is judged on it first
        drift = [3 * x for x in X] * 2
        served = v1
        for _ in range(6):
            receipt = http.post("/outcomes", json={"hours": X * 2, "score": drift}).json()
            if receipt["retrain_job"] is not None:
                wait_job(http, receipt["retrain_job"])
            served = http.get("/models").json()["served_version"]
            if served != v1 and http.get(f"/models/{served}").json()["w"] > 2.5:
                break
        model = http.get(f"/models/{served}").json()
        assert served not in (v1, v2)
        assert model["w"] == pytest.approx(3.0, abs=0.1)
        assert model["rollout"]["state"] == "promoted"
        old = http.get(f"/models/{v1}").json()["quality"]
        assert old["mae"] > 10 * mae_before  # the old version's live error rose
        new = model["quality"]
        assert new["mae"] < old["mae"] / 5
        metrics = http.get("/metrics").text
        assert f"sgd_model_version {float(served)}" in metrics
        assert f'sgd_live_mae{{version="{served}"}}' in metrics
        canary = http.get("/models").json()["canary"]  # the next retrained one, perhaps
        live = {served} | ({canary["version"]} if canary else set())
        answered = {version_of(http.get("/predict", params={"hours": 4})) for _ in range(50)}
        assert served in answered
        assert answered <= live


def test_continuous_training_on_the_served_versions_rows_too(make: Callable[..., Server]) -> None:
    srv = make(
        SGD_RETRAIN_AFTER="10",
        SGD_RETRAIN_ROWS="10",
        SGD_RETRAIN_EPOCHS="50",
        SGD_RETRAIN_FIT_ROWS="true",
    )
    with srv.client() as http:
        v1 = fit(http)  # on 20 rows
        receipt = http.post("/outcomes", json={"hours": X[:10], "score": X[:10]}).json()
        job = wait_job(http, receipt["retrain_job"])
        assert job["status"] == "succeeded", job
        assert job["n_samples"] == 20 + 10  # the fit's rows, then the outcomes
        assert job["params"]["init_from"] == v1
        canary = http.get("/models").json()["canary"]
        assert canary["version"] == job["result"]["model_version"]
        assert canary["stable_version"] == v1


def test_two_replicas_split_every_key_the_same_way(fleet: Fleet) -> None:
    a, b = fleet.replica(workers=1), fleet.replica()
    with a.client() as http, b.client() as other:
        v1 = fit(http)
        v2 = fit(http, slope=2.5, publish="never")
        assert http.post(f"/models/{v2}/serve", json={"traffic": 30}).status_code == 200
        wait_until(lambda: other.get("/models").json()["canary"] is not None, 10, "canary seen")
        wait_until(
            lambda: any(
                version_of(other.get("/predict", params={"hours": 1, "key": f"k{i}"})) == v2
                for i in range(50)
            ),
            10,
            "the canary answered by the second replica",
        )
        for i in range(300):
            key = f"k{i}"
            mine = version_of(http.get("/predict", params={"hours": 1, "key": key}))
            theirs = version_of(other.get("/predict", params={"hours": 1, "key": key}))
            assert mine == theirs, key
        assert http.delete(f"/models/{v2}/serve").status_code == 200
        wait_until(lambda: other.get("/models").json()["canary"] is None, 10, "rollback seen")
        wait_until(
            lambda: all(
                version_of(other.get("/predict", params={"hours": 1, "key": f"k{i}"})) == v1
                for i in range(50)
            ),
            10,
            "every key back on the stable version",
        )
