"""The store alone: transitions, publishing, idempotency, eviction and history paging.

Every test runs once per implementation of the Store protocol (the `make_store` fixture): a new
store is one more entry in STORES. None of them looks inside MemoryStore.
"""

from array import array
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from service.core import intervals
from service.core.errors import (
    HistoryNotFound,
    IdempotencyKeyReused,
    JobAlreadyEnded,
    JobNotFound,
    VersionNotFound,
)
from service.core.schemas import FitReport, JobParams, JobStatus
from service.state.base import Store
from service.state.memory import MemoryStore
from service.state.redis import RedisStore
from tests.conftest import RedisServer

MakeStore = Callable[[int], Store]  # keep_jobs -> an empty store

PARAMS = JobParams(
    epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
)


@pytest.fixture(scope="module", params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Empty stores of one implementation, by keep_jobs (module scope: `chunked` uses it)."""
    if request.param == "memory":
        yield MemoryStore
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    made: list[RedisStore] = []

    def make(keep_jobs: int) -> Store:
        store = RedisStore(redis_server.url, redis_server.prefix(), keep_jobs, watch=False)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def run(store: Store, epochs: int = 10, w: float = 2.0) -> str:
    job, _ = store.create_job(PARAMS.model_copy(update={"epochs": epochs}), 3)
    assert store.start_job(job.id) is not None
    store.append_history(job.id, [1.0] * epochs, None, [0.5] * epochs)
    store.succeed_job(job.id, FitReport.plain(w, 0.0, 0.5, 0.25))
    return job.id


def test_publishing_makes_a_new_immutable_version(make_store: MakeStore) -> None:
    store = make_store(10)
    assert store.model is None
    first = run(store, w=2.0)
    model1 = store.model
    assert model1 is not None
    assert (model1.version, model1.w, model1.job_id) == (1, 2.0, first)
    run(store, w=3.0)
    assert store.model is not None
    assert (store.model.version, store.model.w) == (2, 3.0)
    assert (model1.version, model1.w) == (1, 2.0)  # the old snapshot never changes
    assert store.get_job(first).result is not None
    assert store.get_job(first).result.model_version == 1


def test_transitions(make_store: MakeStore) -> None:
    store = make_store(10)
    job, created = store.create_job(PARAMS, 3)
    assert created
    assert job.status is JobStatus.queued
    assert store.end_job(job.id, JobStatus.cancelled).status is JobStatus.cancelled
    assert store.start_job(job.id) is None  # a cancelled job never starts
    with pytest.raises(JobAlreadyEnded):
        store.end_job(job.id, JobStatus.failed)
    with pytest.raises(JobNotFound):
        store.get_job("nope")


def test_failed_job_keeps_its_problem_and_publishes_nothing(make_store: MakeStore) -> None:
    store = make_store(10)
    job, _ = store.create_job(PARAMS, 3)
    store.start_job(job.id)
    problem = {"type": "diverged", "title": "t", "status": 422, "detail": "d", "epoch": 7}
    ended = store.end_job(job.id, JobStatus.failed, problem)
    assert ended.error is not None
    assert ended.error.type == "diverged"
    assert ended.error.model_dump()["epoch"] == 7
    assert store.model is None


def test_idempotency_key_returns_the_original_or_refuses_another_body(
    make_store: MakeStore,
) -> None:
    store = make_store(10)
    job, created = store.create_job(PARAMS, 3, ("k1", "body-a"))
    again, created_again = store.create_job(PARAMS, 3, ("k1", "body-a"))
    assert created
    assert not created_again
    assert again.id == job.id
    with pytest.raises(IdempotencyKeyReused):
        store.create_job(PARAMS, 3, ("k1", "body-b"))
    assert len(store.list_jobs(100)) == 1


def test_eviction_is_oldest_first_and_spares_the_served_model(make_store: MakeStore) -> None:
    store = make_store(2)
    served = run(store)
    # a failed job ends later than the served model's: the served one is older but kept
    ids: list[str] = []
    for _ in range(3):
        job, _ = store.create_job(PARAMS, 3, (f"key-{len(ids)}", "b"))
        store.start_job(job.id)
        store.end_job(job.id, JobStatus.failed, None)
        ids.append(job.id)
    kept = {j.id for j in store.list_jobs(100)}
    assert served in kept
    assert ids[0] not in kept
    assert ids[-1] in kept
    assert len(kept) == 3  # two newest ended jobs plus the served model's
    # an evicted job's idempotency key is forgotten with it
    fresh, created = store.create_job(PARAMS, 3, ("key-0", "other"))
    assert created
    assert fresh.id != ids[0]


def test_history_pages_and_thins(make_store: MakeStore) -> None:
    store = make_store(10)
    with pytest.raises(HistoryNotFound):
        store.history(None, 0, None, 100)
    job, _ = store.create_job(PARAMS.model_copy(update={"epochs": 1000}), 3)
    store.start_job(job.id)
    store.append_history(job.id, [float(i) for i in range(1000)], None, [1.0] * 1000)
    page = store.history(None, since=100, limit=50, max_points=10_000)
    assert page.epoch == list(range(100, 150))
    assert page.w == [float(i) for i in range(100, 150)]
    assert page.next_since == 150
    assert page.stride == 1
    thin = store.history(job.id, since=0, limit=None, max_points=10)
    assert thin.count == len(thin.epoch) <= 10
    assert thin.epoch[0] == 0
    assert thin.epoch[-1] == 999
    assert thin.stride > 1
    assert thin.w == [float(e) for e in thin.epoch]
    assert thin.next_since == 1000  # still running: more may come


CHUNKS = [1, 7, 1000, 3, 1, 250, 4096, 2]  # the dispatcher appends chunks of any size


@pytest.fixture(scope="module")
def chunked(make_store: MakeStore) -> tuple[Store, str, int]:
    """A job whose history arrived in uneven chunks: w = epoch, loss = -epoch, b = epoch / 2."""
    store = make_store(10)
    total = sum(CHUNKS)
    params = PARAMS.model_copy(update={"epochs": total, "fit_intercept": True})
    job, _ = store.create_job(params, 3)
    store.start_job(job.id)
    first = 0
    for i, size in enumerate(CHUNKS):
        epochs = range(first, first + size)
        columns: list[Sequence[float]] = [
            [float(e) for e in epochs],
            [e / 2 for e in epochs],
            [-float(e) for e in epochs],
        ]
        if i % 2:  # as the runner hands them over: read-only views of bytes (MemoryStore keeps)
            columns = [memoryview(array("d", c).tobytes()).cast("d") for c in columns]
        w, b, loss = columns
        store.append_history(job.id, w, b, loss)
        first += size
    return store, job.id, total


@pytest.mark.parametrize(
    ("since", "limit", "max_points"),
    [
        (0, None, 2),
        (0, None, 10),
        (0, None, 10_000),
        (5, 3, 10_000),  # a page inside one chunk
        (6, 3, 10_000),  # a page across a chunk boundary
        (7, 1001, 3),
        (1008, 5000, 17),
        (5359, None, 2),  # the last epoch alone
        (5360, None, 10),  # past the end: an empty page
        (1, 5358, 1000),
        (0, 5360, 5360),
        (0, 5360, 5359),
    ],
)
def test_history_across_chunks_keeps_first_and_last_within_the_budget(
    chunked: tuple[Store, str, int], since: int, limit: int | None, max_points: int
) -> None:
    store, job_id, total = chunked
    assert total == 5360
    page = store.history(job_id, since, limit, max_points)
    end = total if limit is None else min(total, since + limit)
    assert page.total_epochs == total
    assert page.count == len(page.epoch) <= max_points
    if since >= total:
        assert page.epoch == page.w == page.loss == []
        return
    assert page.epoch[0] == since
    assert page.epoch[-1] == end - 1
    assert page.epoch == sorted(set(page.epoch))
    assert all(b - a == page.stride for a, b in zip(page.epoch[:-2], page.epoch[1:-1], strict=True))
    assert page.w == [float(e) for e in page.epoch]
    assert page.loss == [-float(e) for e in page.epoch]
    assert page.b == [e / 2 for e in page.epoch]


def test_eviction_goes_by_the_order_jobs_ended_not_were_created(make_store: MakeStore) -> None:
    # A long job created first and ended last is the newest ended job: ending it never evicts it
    # (by creation order it was dropped inside its own end, and the dispatcher died of it).
    store = make_store(1)
    long, _ = store.create_job(PARAMS, 3)
    store.start_job(long.id)
    short, _ = store.create_job(PARAMS, 3)
    store.end_job(short.id, JobStatus.cancelled)
    ended = store.end_job(long.id, JobStatus.cancelled)
    assert ended.id == long.id
    assert store.get_job(long.id).status is JobStatus.cancelled
    assert [j.id for j in store.list_jobs(10)] == [long.id]


def test_a_retried_job_starts_its_history_over(make_store: MakeStore) -> None:
    store = make_store(10)
    job, _ = store.create_job(PARAMS, 3)
    assert store.start_job(job.id).attempts == 1  # type: ignore[union-attr]
    store.append_history(job.id, [1.0, 1.5], None, [4.0, 1.0])
    again = store.retry_job(job.id)
    assert again.attempts == 2
    assert again.status is JobStatus.running
    assert again.progress.epoch == 0
    assert store.history(job.id, 0, None, 100).total_epochs == 0
    store.end_job(job.id, JobStatus.cancelled)
    with pytest.raises(JobAlreadyEnded):
        store.retry_job(job.id)


def test_versions_are_kept_and_any_can_be_served_again(make_store: MakeStore) -> None:
    store = make_store(10)
    for w in (1.0, 2.0, 3.0):
        run(store, w=w)
    assert [m.version for m in store.versions(10)] == [3, 2, 1]
    assert [m.version for m in store.versions(2)] == [3, 2]
    assert store.version(2).w == 2.0
    served = store.serve(1)
    assert (served.version, served.w) == (1, 1.0)
    assert store.model is not None
    assert store.model.version == 1
    run(store, w=4.0)  # the next publication takes the next number, and is served
    assert store.model is not None
    assert (store.model.version, store.model.w) == (4, 4.0)
    with pytest.raises(VersionNotFound):
        store.version(9)
    with pytest.raises(VersionNotFound):
        store.serve(9)
    assert store.model.version == 4


def test_a_held_version_is_the_kept_one_or_none(make_store: MakeStore) -> None:
    """held() answers without waiting, and only with what version() would answer: every kept
    version in memory, the served one on Redis (the others may be evicted by any replica)."""
    store = make_store(10)
    for w in (1.0, 2.0):
        run(store, w=w)
    served = store.held(2)
    assert served is not None
    assert served == store.version(2) == store.model
    kept = store.held(1)
    if isinstance(store, MemoryStore):
        assert kept == store.version(1)
    else:
        assert kept is None
    assert store.held(9) is None


def test_a_version_keeps_its_interval_data(make_store: MakeStore) -> None:
    """The summary travels in the version's JSON; the conformal residuals beside it, held by
    the served model, by version() and by a version served again; an evicted version's go."""
    x = np.arange(1.0, 21.0)
    y = 2 * x + np.sin(x)
    summary, residuals = intervals.summarise((x, y), (x, y + 0.5), 2.0, 0.0, False)
    assert residuals is not None
    store = make_store(10)
    job, _ = store.create_job(PARAMS, 20)
    assert store.start_job(job.id) is not None
    store.append_history(job.id, [1.0], None, [0.5])
    report = FitReport.plain(2.0, 0.0, 0.5, 0.25).model_copy(
        update={"intervals": summary, "residuals": residuals.tobytes()}
    )
    store.succeed_job(job.id, report)
    assert store.model is not None
    for model in (store.model, store.version(1), store.held(1)):
        assert model is not None
        assert model.intervals == summary
        assert model.residuals is not None
        assert model.residuals.tobytes() == residuals.tobytes()
        method, half = model.half_width(4.0, 0.9, None)
        assert method == "conformal"
        assert summary.conformal is not None
        assert half == residuals[intervals.rank(0.9, 20) - summary.conformal.first_rank]
    run(store, w=3.0)  # a version without intervals: only their absence is kept
    assert store.model is not None
    assert (store.model.intervals, store.model.residuals) == (None, None)
    again = store.serve(1)
    assert store.model is again
    assert again.residuals is not None
    assert again.residuals.tobytes() == residuals.tobytes()


def test_a_replica_reads_the_residuals_and_eviction_drops_them(redis_server: RedisServer) -> None:
    x = np.arange(1.0, 21.0)
    summary, residuals = intervals.summarise((x, 2 * x), (x, 2 * x + x % 3), 2.0, 0.0, False)
    assert residuals is not None
    report = FitReport.plain(2.0, 0.0, 0.5, 0.25).model_copy(
        update={"intervals": summary, "residuals": residuals.tobytes()}
    )
    prefix = redis_server.prefix()
    one = RedisStore(redis_server.url, prefix, 10, keep_versions=2, watch=False)
    other = RedisStore(redis_server.url, prefix, 10, keep_versions=2, watch=False)
    try:
        for _ in range(3):
            job, _ = one.create_job(PARAMS, 20)
            assert one.start_job(job.id) is not None
            one.succeed_job(job.id, report)
            other.refresh()
            assert other.model is not None
            assert other.model.residuals is not None
            assert other.model.residuals.tobytes() == residuals.tobytes()
        # two versions kept, and the residuals of those two alone
        assert sorted(one.redis.keys(prefix + "residuals:*")) == [
            f"{prefix}residuals:{v}".encode() for v in (2, 3)
        ]
        # a kept version read from Redis reads one residual there, 8 bytes, when asked
        kept = other.version(2)
        assert kept.intervals_wait
        assert other.model is not None
        assert kept.half_width(4.0, 0.9, None) == other.model.half_width(4.0, 0.9, None)
        one.redis.delete(f"{prefix}residuals:2")  # as if evicted meanwhile
        with pytest.raises(VersionNotFound):
            kept.half_width(4.0, 0.9, None)
        assert not other.model.intervals_wait  # the served one's are in memory
    finally:
        one.close()
        other.close()
