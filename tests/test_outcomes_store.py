"""The store's outcomes, live quality and canary rollouts, on both stores (as tests/test_store.py).

Numbers are checked against what they must be by hand: a version y = w x scored on outcomes
(x, y) has |error| = |y - w x| for each.
"""

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from service.core.errors import RolloutConflict, VersionNotFound
from service.core.schemas import CanaryRule, FitReport, JobParams, JobStatus
from service.state.base import Store
from service.state.memory import MemoryStore
from service.state.redis import RedisStore
from tests.conftest import RedisServer

MakeStore = Callable[..., Store]

PARAMS = JobParams(
    epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Empty stores of one implementation (keep_versions, keep_outcomes, quality_window)."""
    if request.param == "memory":
        yield lambda **kw: MemoryStore(10, **kw)
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    made: list[RedisStore] = []
    prefix = redis_server.prefix()

    def make(
        keep_versions: int = 100,
        keep_outcomes: int = 100_000,
        quality_window: int = 1000,
        keep_fit_rows: bool = False,
    ) -> Store:
        store = RedisStore(
            redis_server.url,
            prefix,
            10,
            keep_versions=keep_versions,
            watch=False,
            keep_outcomes=keep_outcomes,
            quality_window=quality_window,
            keep_fit_rows=keep_fit_rows,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def publish(
    store: Store, w: float, params: JobParams = PARAMS, rows: tuple[bytes, bytes] | None = None
) -> int:
    """A fit of y = w x (on `rows`), published as `params` says; its version."""
    job, _ = store.create_job(params, 3, samples=rows)
    assert store.start_job(job.id) is not None
    ended = store.succeed_job(job.id, FitReport.plain(w, 0.0, 0.5, 0.25))
    assert ended.result is not None
    return ended.result.model_version


def record(store: Store, x: list[float], y: list[float], named: int | None = None):  # type: ignore[no-untyped-def]
    model = None if named is None else store.version(named)
    return store.record_outcomes(np.array(x, float), np.array(y, float), model)


def test_outcomes_are_scored_against_the_served_version(make_store: MakeStore) -> None:
    store = make_store()
    v1 = publish(store, 2.0)
    assert store.quality(v1) is None
    receipt = record(store, [1, 2, 3], [2.5, 4.0, 5.0])  # errors 0.5, 0, 1
    assert (receipt.recorded, receipt.kept, receipt.total, receipt.versions) == (3, 3, 3, [v1])
    assert receipt.decision is None
    quality = store.quality(v1)
    assert quality is not None
    assert quality.outcomes == 3
    assert quality.mae == pytest.approx(0.5)
    assert quality.rmse == pytest.approx(np.sqrt((0.25 + 0 + 1) / 3))
    assert quality.coverage is None  # a plain fit has no interval


def test_the_window_and_the_kept_outcomes_are_bounded(make_store: MakeStore) -> None:
    store = make_store(keep_outcomes=4, quality_window=2)
    v1 = publish(store, 2.0)
    record(store, [1, 2, 3], [2.0, 4.0, 6.0])  # errors 0, 0, 0
    receipt = record(store, [4, 5], [9.0, 13.0])  # errors 1, 3
    assert (receipt.kept, receipt.total) == (4, 5)
    quality = store.quality(v1)
    assert quality is not None
    assert (quality.outcomes, quality.window, quality.mae) == (2, 2, 2.0)  # the last two
    hours, scores = store.recent_outcomes(10)
    assert hours.tolist() == [2, 3, 4, 5]
    assert scores.tolist() == [4, 6, 9, 13]
    assert store.recent_outcomes(2)[0].tolist() == [4, 5]


def test_a_named_version_is_scored_too(make_store: MakeStore) -> None:
    store = make_store()
    v1 = publish(store, 3.0)
    v2 = publish(store, 2.0)
    receipt = record(store, [1.0], [3.0], named=v1)
    assert receipt.versions == [v1, v2]
    q1, q2 = store.quality(v1), store.quality(v2)
    assert q1 is not None
    assert q2 is not None
    assert (q1.mae, q2.mae) == (0.0, 1.0)


def test_canary_conflicts_change_nothing(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(VersionNotFound):
        store.start_canary(1, CanaryRule(traffic=10))
    v1 = publish(store, 2.0)
    with pytest.raises(RolloutConflict, match="served to everyone already"):
        store.start_canary(v1, CanaryRule(traffic=10))
    v2 = publish(store, 2.1, PARAMS.model_copy(update={"publish": "never"}))
    v3 = publish(store, 2.2, PARAMS.model_copy(update={"publish": "never"}))
    rollout = store.start_canary(v2, CanaryRule(traffic=10))
    assert (rollout.version, rollout.stable_version, rollout.traffic) == (v2, v1, 10)
    assert rollout.state == "running"
    with pytest.raises(RolloutConflict, match=f"canary of version {v2} runs"):
        store.start_canary(v3, CanaryRule(traffic=20))
    with pytest.raises(RolloutConflict, match=f"serving version {v3} by hand"):
        store.serve(v3)
    with pytest.raises(RolloutConflict, match="not being rolled out"):
        store.rollback(v3)
    assert store.model is not None
    assert store.model.version == v1
    assert store.canary is not None
    assert store.canary.model.version == v2


def test_serving_the_canary_promotes_it_and_a_rollback_ends_it(make_store: MakeStore) -> None:
    store = make_store()
    v1 = publish(store, 2.0)
    never = PARAMS.model_copy(update={"publish": "never"})
    v2, v3 = publish(store, 2.1, never), publish(store, 2.2, never)
    store.start_canary(v2, CanaryRule(traffic=50))
    store.serve(v2)
    assert store.model is not None
    assert store.model.version == v2
    assert store.canary is None
    promoted = store.rollout(v2)
    assert promoted is not None
    assert (promoted.state, promoted.reason) == (
        "promoted",
        "promoted by hand (POST /models/{v}/serve)",
    )
    store.start_canary(v3, CanaryRule(traffic=5))
    ended = store.rollback(v3)
    assert ended.state == "rolled_back"
    assert store.canary is None
    assert store.model.version == v2
    assert store.rollout(v1) is None


@pytest.mark.parametrize(("canary_w", "state"), [(3.0, "promoted"), (1.5, "rolled_back")])
def test_the_rule_decides_once_it_has_its_outcomes(
    make_store: MakeStore, canary_w: float, state: str
) -> None:
    store = make_store()
    v1 = publish(store, 2.0)
    v2 = publish(store, canary_w, PARAMS.model_copy(update={"publish": "never"}))
    store.start_canary(v2, CanaryRule(traffic=10, promote_after=6, max_worse=0.05))
    x = [1.0, 2.0, 3.0]
    y = [3.0, 6.0, 9.0]  # the truth is y = 3x
    first = record(store, x, y)
    assert first.decision is None
    running = store.rollout(v2)
    assert running is not None
    assert (running.state, running.outcomes) == ("running", 3)
    second = record(store, x, y)
    decision = second.decision
    assert decision is not None
    assert (decision.version, decision.state, decision.outcomes) == (v2, state, 6)
    mine, theirs = abs(3 - canary_w) * 2, 2.0  # mean |3x - w x| over x = 1, 2, 3
    assert (decision.mae, decision.stable_mae) == (pytest.approx(mine), pytest.approx(theirs))
    assert store.rollout(v2) == decision
    assert store.canary is None
    assert store.model is not None
    assert store.model.version == (v2 if state == "promoted" else v1)
    assert record(store, x, y).decision is None  # decided once


def test_a_fit_published_as_a_canary(make_store: MakeStore) -> None:
    store = make_store()
    canary = PARAMS.model_copy(
        update={"publish": "canary", "canary": CanaryRule(traffic=20, promote_after=3)}
    )
    v1 = publish(store, 2.0, canary)  # nothing is served: it cannot be a canary
    job = store.list_jobs(1)[0]
    assert job.result is not None
    assert job.result.published is False
    assert "not rolled out as a canary" in (job.result.not_published_because or "")
    store.serve(v1)
    v2 = publish(store, 2.5, canary)
    assert store.canary is not None
    assert (store.canary.model.version, store.canary.rollout.traffic) == (v2, 20)
    assert store.model is not None
    assert store.model.version == v1
    v3 = publish(store, 2.7)  # published to everyone: the canary ends
    assert store.canary is None
    ended = store.rollout(v2)
    assert ended is not None
    assert ended.state == "rolled_back"
    assert f"version {v3} was published" in (ended.reason or "")


def test_the_canary_is_never_evicted(make_store: MakeStore) -> None:
    store = make_store(keep_versions=2)
    publish(store, 2.0)
    never = PARAMS.model_copy(update={"publish": "never"})
    v2 = publish(store, 2.1, never)
    store.start_canary(v2, CanaryRule(traffic=10))
    for w in (2.2, 2.3, 2.4):
        publish(store, w, never)
    assert store.version(v2).version == v2
    assert store.canary is not None


def test_replicas_recording_at_once_decide_once(redis_server: RedisServer) -> None:
    prefix = redis_server.prefix()
    stores = [RedisStore(redis_server.url, prefix, 10, watch=False) for _ in range(4)]
    try:
        v1 = publish(stores[0], 2.0)
        v2 = publish(stores[0], 3.0, PARAMS.model_copy(update={"publish": "never"}))
        stores[0].start_canary(v2, CanaryRule(traffic=10, promote_after=40))
        decisions = []

        def feed(store: RedisStore) -> None:
            for _ in range(10):
                receipt = record(store, [1.0, 2.0], [3.0, 6.0])
                if receipt.decision is not None:
                    decisions.append(receipt.decision)

        threads = [threading.Thread(target=feed, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(decisions) == 1
        assert decisions[0].state == "promoted"
        assert decisions[0].outcomes >= 40
        assert stores[1].record_outcomes(np.ones(1), np.ones(1)).total == 81
        stores[2].refresh()
        assert stores[2].model is not None
        assert stores[2].model.version == v2
        q1 = stores[3].quality(v1)
        assert q1 is not None
        assert q1.outcomes >= 40
    finally:
        for store in stores:
            store.close()


def test_a_version_keeps_its_fit_rows_when_asked(make_store: MakeStore) -> None:
    x, y = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])
    rows = (x.tobytes(), y.tobytes())
    plain = make_store()
    assert plain.fit_rows(publish(plain, 2.0, rows=rows)) is None  # not asked: not kept
    store = make_store(keep_versions=2, keep_fit_rows=True)
    v1 = publish(store, 2.0, rows=rows)
    kept = store.fit_rows(v1)
    assert kept is not None
    assert kept[0].tolist() == x.tolist()
    assert kept[1].tolist() == y.tolist()
    never = PARAMS.model_copy(update={"publish": "never"})
    v2 = publish(store, 2.0, never)
    assert store.fit_rows(v2) is None  # a fit given no rows keeps none
    job, _ = store.create_job(PARAMS, 3, samples=rows)  # a job that fails keeps nothing
    assert store.start_job(job.id) is not None
    store.end_job(job.id, JobStatus.failed, None)
    v3 = publish(store, 2.0, never, rows)
    assert store.fit_rows(v3) is not None
    publish(store, 2.0, never, rows)  # keep_versions=2: version 1 (served) stays, 2 and 3 go
    assert store.fit_rows(v1) is not None
    assert store.fit_rows(v3) is None  # evicted with its version
    with pytest.raises(VersionNotFound):
        store.version(v3)
