"""The runner with its real worker process and the real store: run, cancel, queue, drain, crash."""

import os
import signal
import time
from array import array
from collections.abc import Iterator

import pytest

from service.errors import JobAlreadyEnded, QueueFull, ShuttingDown
from service.jobs import JobRunner
from service.schemas import Job, JobParams, JobStatus
from service.settings import Settings
from service.store import MemoryStore
from tests.conftest import SLOW_BATCH, wait_until

X = array("d", [1.0, 2.0, 3.0]).tobytes()
Y = array("d", [2.0, 4.0, 6.0]).tobytes()
BIG_N = 200_000
BIG_X = array("d", [float(i % 10 + 1) for i in range(BIG_N)]).tobytes()
BIG_Y = array("d", [2.0 * (i % 10 + 1) for i in range(BIG_N)]).tobytes()


def params(**changes: object) -> JobParams:
    base = JobParams(
        epochs=100, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=7
    )
    return base.model_copy(update=changes)


# batches of 100,000 of 200,000 samples: minutes of work, whatever the engine
SLOW = params(epochs=1_000_000, batch_size=SLOW_BATCH, learning_rate=0.001)


@pytest.fixture
def runner() -> Iterator[tuple[JobRunner, MemoryStore]]:
    store = MemoryStore(keep_jobs=50)
    r = JobRunner(store, Settings(max_queued_jobs=2))
    r.start()
    wait_until(lambda: r.ready, what="worker start-up")
    yield r, store
    r.stop()


def submit(runner: JobRunner, store: MemoryStore, p: JobParams, big: bool = False) -> Job:
    job, _ = store.create_job(p, BIG_N if big else 3)
    runner.submit(job, BIG_X if big else X, BIG_Y if big else Y)
    return job


def ended(store: MemoryStore, job_id: str, deadline: float = 60.0) -> Job:
    wait_until(lambda: store.get_job(job_id).status.ended, deadline, f"job {job_id} to end")
    return store.get_job(job_id)


def test_a_job_runs_in_the_worker_and_publishes_its_model(
    runner: tuple[JobRunner, MemoryStore],
) -> None:
    r, store = runner
    job = ended(store, submit(r, store, params()).id)
    assert job.status is JobStatus.succeeded
    assert job.result is not None
    assert abs(job.result.w - 2.0) < 0.01
    assert store.model is not None
    assert store.model.job_id == job.id
    hist = store.history(job.id, 0, None, 1000)
    assert hist.total_epochs == 100
    assert hist.w[0] == 1.0
    worker = r.worker_info["pid"]
    assert worker != os.getpid()
    # background work, as the OS sees it: the lowest niceness, under SCHED_IDLE
    assert os.getpriority(os.PRIO_PROCESS, worker) == Settings().worker_nice == 19
    assert os.sched_getscheduler(worker) == os.SCHED_IDLE
    assert r.worker_info["policy"] == "idle"


def test_cancel_a_running_job_within_seconds(runner: tuple[JobRunner, MemoryStore]) -> None:
    r, store = runner
    job = submit(r, store, SLOW, big=True)
    wait_until(lambda: store.get_job(job.id).progress.epoch > 0, what="progress")
    asked = time.monotonic()
    r.cancel(job.id)
    done = ended(store, job.id, deadline=5.0)
    assert done.status is JobStatus.cancelled
    assert time.monotonic() - asked < 2.0
    assert store.model is None  # nothing a cancelled job produced is served
    with pytest.raises(JobAlreadyEnded):
        r.cancel(job.id)
    # the worker is free again
    assert ended(store, submit(r, store, params()).id).status is JobStatus.succeeded


def test_queue_is_bounded_and_queued_jobs_cancel_at_once(
    runner: tuple[JobRunner, MemoryStore],
) -> None:
    r, store = runner
    running = submit(r, store, SLOW, big=True)
    wait_until(lambda: store.get_job(running.id).status is JobStatus.running, what="running")
    queued = [submit(r, store, params()) for _ in range(2)]
    extra, _ = store.create_job(params(), 3)
    with pytest.raises(QueueFull) as info:
        r.submit(extra, X, Y)
    assert int(info.value.headers["Retry-After"]) >= 1
    assert r.cancel(queued[0].id).status is JobStatus.cancelled
    r.cancel(running.id)
    assert ended(store, running.id).status is JobStatus.cancelled
    assert ended(store, queued[1].id).status is JobStatus.succeeded
    assert store.get_job(queued[0].id).started_at is None


def test_drain_refuses_new_fits_and_cancels_everything(
    runner: tuple[JobRunner, MemoryStore],
) -> None:
    r, store = runner
    running = submit(r, store, SLOW, big=True)
    queued = submit(r, store, params())
    wait_until(lambda: store.get_job(running.id).status is JobStatus.running, what="running")
    r.drain()
    assert not r.ready
    with pytest.raises(ShuttingDown):
        submit(r, store, params())
    assert ended(store, running.id, deadline=5.0).status is JobStatus.cancelled
    assert store.get_job(queued.id).status is JobStatus.cancelled


def test_a_crashed_worker_fails_its_job_and_is_replaced(
    runner: tuple[JobRunner, MemoryStore],
) -> None:
    r, store = runner
    job = submit(r, store, SLOW, big=True)
    wait_until(lambda: store.get_job(job.id).progress.epoch > 0, what="progress")
    old_pid = r.worker_info["pid"]
    os.kill(old_pid, signal.SIGKILL)
    failed = ended(store, job.id)
    assert failed.status is JobStatus.failed
    assert failed.error is not None
    assert failed.error.type == "worker-crashed"
    wait_until(lambda: r.ready and r.worker_info["pid"] != old_pid, what="a new worker")
    assert ended(store, submit(r, store, params()).id).status is JobStatus.succeeded
