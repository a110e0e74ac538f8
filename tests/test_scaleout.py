"""Many replicas, one model, nothing lost: real replicas, real workers and a real redis-server
of each test's own, which the tests stop, kill and restart.

The API behaviour itself runs against both stores in the other modules (the `client`,
`make_client` and `server` fixtures); these are the faults and the sharing that only Redis mode
has. Figures (propagation lag, recovery times) are printed; `make bench` measures speed.
"""

import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.errors import Fenced
from service.core.schemas import FitReport, JobParams, JobStatus
from service.state.redis import RedisStore
from tests.conftest import (
    TIMEOUT,
    TUTORIAL,
    WORKER_CRASHED_MEMBERS,
    Fleet,
    RedisServer,
    Server,
    named_descendants,
    wait_job,
    wait_until,
)

# A few seconds of work in a worker, and minutes of it.
SECONDS = {**TUTORIAL, "epochs": 3_000_000, "batch_size": 8, "learning_rate": 0.001}
LONG = {"x": [1.0] * 100_000, "y": [2.0] * 100_000, "batch_size": 100_000, "epochs": 1_000_000}


def started(http: httpx.Client, job_id: str, attempt: int = 1) -> dict[str, Any]:
    """Wait until the job runs its `attempt`-th run and has recorded some epochs."""
    job: dict[str, Any] = {}

    def check() -> bool:
        nonlocal job
        job = http.get(f"/jobs/{job_id}").json()
        return bool(
            job["status"] == "running"
            and job["attempts"] == attempt
            and job["progress"]["epoch"] > 0
        )

    wait_until(check, 60, f"attempt {attempt} running")
    return job


@pytest.mark.timeout(180)
def test_two_replicas_are_one_service(fleet: Fleet) -> None:
    one, two = fleet.replica(workers=1), fleet.replica(workers=0)
    with one.client() as a, two.client() as b:
        key = {"Idempotency-Key": "shared-1"}
        first = a.post("/fit", json={**TUTORIAL, "seed": 7}, headers=key)
        assert first.status_code == 202
        job_id = first.json()["id"]
        # the same key through the other replica is the same job, at once
        again = b.post("/fit", json={**TUTORIAL, "seed": 7}, headers=key)
        assert (again.status_code, again.json()["id"]) == (202, job_id)
        assert b.get(f"/jobs/{job_id}").json()["id"] == job_id
        assert job_id in [j["id"] for j in b.get("/jobs").json()["jobs"]]
        done = wait_job(b, job_id)
        assert done["status"] == "succeeded"
        assert a.get(f"/jobs/{job_id}").json() == done
        history = b.get("/history", params={"job_id": job_id}).json()
        assert history == a.get("/history", params={"job_id": job_id}).json()
        assert history["total_epochs"] == 100
        plot = b.get("/history/plot", params={"job_id": job_id})
        assert plot.headers["content-type"] == "image/png"
        events = b.get(f"/jobs/{job_id}/events").text
        assert "event: end" in events
        version = done["result"]["model_version"]
        wait_until(lambda: b.get("/model").json().get("version") == version, 5, "replica 2 model")
        assert b.get("/predict", params={"hours": 4}).json()["model_version"] == version
        # cancel through the replica that does not run it
        long = a.post("/fit", json=LONG).json()["id"]
        started(a, long)
        cancelled = b.post(f"/jobs/{long}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert a.get(f"/jobs/{long}").json()["status"] == "cancelled"


@pytest.mark.timeout(240)
def test_every_replica_serves_a_new_version_within_a_second(fleet: Fleet) -> None:
    one, two = fleet.replica(workers=1), fleet.replica(workers=0)
    lags = []
    with one.client() as a, two.client() as b:
        for seed in range(10):
            job = wait_job(a, a.post("/fit", json={**TUTORIAL, "seed": seed}).json()["id"])
            version = job["result"]["model_version"]
            # published when the job ended; replica 2 serves it this much later
            published = job["finished_at"]
            wait_until(serves(b, version), 5, "propagation")
            seen = time.time()
            lags.append(seen - _epoch_seconds(published))
    lags.sort()
    print(
        f"\npropagation lag (upper bound, incl. polling): p50 {statistics.median(lags):.3f}s, "
        f"max {lags[-1]:.3f}s over {len(lags)} versions"
    )
    assert lags[-1] < 5  # the bound of the wait above: every version did arrive


def serves(http: httpx.Client, version: int) -> Callable[[], bool]:
    return lambda: bool(http.get("/model").json()["version"] >= version)


def _epoch_seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(180)
def test_a_killed_workers_fit_runs_again_and_succeeds(fleet: Fleet) -> None:
    srv = fleet.replica(workers=0)
    first, _ = fleet.worker()
    with srv.client() as http:
        job_id = http.post("/fit", json=SECONDS).json()["id"]
        started(http, job_id)
        first.kill()  # kill -9, mid-fit
        first.wait(10)
        # no live worker: once the lease has run out the job is no longer shown running
        wait_until(
            lambda: http.get(f"/jobs/{job_id}").json()["status"] == "queued", 30, "shown queued"
        )
        fleet.worker()
        back = time.monotonic()
        done = wait_job(http, job_id, deadline=120)
        print(f"\nre-run ended {time.monotonic() - back:.1f}s after a live worker was back")
        assert done["status"] == "succeeded"
        assert done["attempts"] == 2
        assert done["progress"]["epoch"] == SECONDS["epochs"]
        history = http.get("/history", params={"job_id": job_id, "max_points": 2}).json()
        assert history["total_epochs"] == SECONDS["epochs"]  # the first run's epochs are gone


@pytest.mark.timeout(180)
def test_a_paused_worker_cannot_write_after_it_lost_its_job(fleet: Fleet) -> None:
    srv = fleet.replica(workers=0)
    paused, paused_log = fleet.worker()
    with srv.client() as http:
        job_id = http.post("/fit", json=LONG).json()["id"]
        started(http, job_id)
        paused.send_signal(signal.SIGSTOP)  # past its lease: another worker re-runs the job
        fleet.worker()
        started(http, job_id, attempt=2)
        paused.send_signal(signal.SIGCONT)
        wait_until(lambda: "lost the job" in paused_log.read_text(), 30, "the fenced worker")
        cancelled = http.post(f"/jobs/{job_id}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["attempts"] == 2
        history = http.get("/history", params={"job_id": job_id, "max_points": 2}).json()
        # every recorded epoch is the second attempt's: nothing of the first landed after it
        assert history["total_epochs"] == cancelled["progress"]["epoch"]
        assert http.get("/model").status_code == 503  # nothing was published


def test_a_fit_whose_workers_all_died_fails_with_the_in_memory_shape(
    redis_server: RedisServer,
) -> None:
    """Its attempts spent, a fit fails with the same worker-crashed members as in memory mode
    (tests/test_jobs.py): the attempts made, as a number."""
    store = RedisStore(redis_server.url, redis_server.prefix(), keep_jobs=10, watch=False)
    params = JobParams(
        epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
    )
    job, _ = store.create_job(params, 3)
    for attempt in (1, 2):
        claimed = store.claim(job.id, f"worker-{attempt}", f"claim-{attempt}")
        assert claimed is not None
        assert claimed.attempts == attempt
        store.bury(job.id, attempt, b"0", max_attempts=2)  # its beat never moved
    failed = store.get_job(job.id)
    assert failed.status is JobStatus.failed
    assert failed.error is not None
    assert failed.error.type == "worker-crashed"
    assert "died 2 times" in failed.error.detail
    assert set(failed.error.model_dump(exclude_none=True)) == WORKER_CRASHED_MEMBERS
    assert failed.error.model_dump()["attempts"] == 2


def test_a_stale_attempt_can_neither_append_nor_publish(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, redis_server.prefix(), keep_jobs=10, watch=False)
    params = JobParams(
        epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
    )
    job, _ = store.create_job(params, 3)
    old = store.claim(job.id, "worker-a", "claim-a")
    assert old is not None
    store.append_history(job.id, [1.0], None, [0.5], attempt=old.attempts)
    # a delivery of a running job is a duplicate: dropped, whoever gets it; the same claim sent
    # twice (a cut connection) finds itself
    assert store.claim(job.id, "worker-b", "claim-b") is None
    replayed = store.claim(job.id, "worker-a", "claim-a")
    assert replayed is not None
    assert replayed.attempts == old.attempts
    # worker-a's beat stood still: the reconciler buries its attempt, and the job runs again
    buried = store.bury(job.id, old.attempts, b"0", max_attempts=3)
    assert buried is not None
    assert buried.status is JobStatus.queued
    new = store.claim(job.id, "worker-b", "claim-b")
    assert new is not None
    assert new.attempts == old.attempts + 1
    with pytest.raises(Fenced):
        store.append_history(job.id, [9.0], None, [9.0], attempt=old.attempts)
    with pytest.raises(Fenced):
        store.succeed_job(job.id, FitReport.plain(9.0, 0.0, 9.0, 9.0), attempt=old.attempts)
    with pytest.raises(Fenced):
        store.end_job(job.id, JobStatus.failed, attempt=old.attempts)
    assert store.model is None
    assert store.history(job.id, 0, None, 10).total_epochs == 0
    store.append_history(job.id, [2.0], None, [0.1], attempt=new.attempts)
    store.succeed_job(job.id, FitReport.plain(2.0, 0.0, 0.1, 0.1), attempt=new.attempts)
    assert store.model is not None
    assert store.model.w == 2.0
    store.close()


def test_history_sent_again_lands_once(redis_server: RedisServer) -> None:
    """A worker whose append landed but whose answer was lost (Redis killed after the EXEC)
    sends those epochs again, with the ones since: each epoch lands once."""
    store = RedisStore(redis_server.url, redis_server.prefix(), keep_jobs=10, watch=False)
    params = JobParams(
        epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
    )
    job, _ = store.create_job(params, 3)
    run = store.claim(job.id, "worker-a", "claim-a")
    assert run is not None
    store.append_history(job.id, [0.0, 1.0], None, [0.0, 1.0], attempt=run.attempts, at=0)
    store.append_history(job.id, [0.0, 1.0], None, [0.0, 1.0], attempt=run.attempts, at=0)
    store.append_history(job.id, [0.0, 1.0, 2.0], None, [0.0, 1.0, 2.0], attempt=1, at=0)
    store.append_history(job.id, [3.0], None, [3.0], attempt=run.attempts, at=3)
    history = store.history(job.id, 0, None, 10)
    assert history.total_epochs == 4
    assert history.w == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(Fenced):  # a gap: not this attempt's history
        store.append_history(job.id, [9.0], None, [9.0], attempt=run.attempts, at=6)
    store.close()


def test_one_idempotency_key_makes_one_job_across_replicas(redis_server: RedisServer) -> None:
    prefix = redis_server.prefix()
    stores = [RedisStore(redis_server.url, prefix, keep_jobs=10, watch=False) for _ in range(4)]
    params = JobParams(
        epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
    )
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []

    def create(store: RedisStore) -> None:
        barrier.wait()
        job, created = store.create_job(params, 3, ("same-key", "same-body"))
        results.append((job.id, created))

    threads = [threading.Thread(target=create, args=(stores[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(stores[0].list_jobs(100)) == 1  # the losers left nothing behind
    for store in stores:
        store.close()


def _hammer(url: str, stop: threading.Event, errors: list[str], count: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        while not stop.is_set():
            try:
                r = http.get("/predict", params={"hours": 4})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            count[0] += 1


@pytest.mark.timeout(180)
def test_predictions_survive_a_redis_outage_and_fits_come_back(fleet: Fleet) -> None:
    srv = fleet.replica(workers=1)
    with srv.client() as http:
        wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        stop, errors, count = threading.Event(), list[str](), [0]
        threads = [
            threading.Thread(target=_hammer, args=(srv.url, stop, errors, count)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        try:
            fleet.redis.stop()
            wait_until(lambda: http.get("/readyz").status_code == 503, 20, "not ready")
            assert http.get("/readyz").json()["type"] == "store-unavailable"
            refused = http.post("/fit", json=TUTORIAL)
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["type"] == "store-unavailable"
            assert http.get("/jobs").json()["type"] == "store-unavailable"
            metrics = http.get("/metrics")  # what needs no Redis is still reported
            assert metrics.status_code == 200
            assert "sgd_model_version 1.0" in metrics.text
            assert "sgd_ready 0.0" in metrics.text
            during = count[0]
            time.sleep(1)
            assert count[0] > during  # predictions kept flowing while Redis was down
            fleet.redis.start()
            wait_until(lambda: http.get("/readyz").status_code == 200, 30, "ready again")
            job = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
            assert job["status"] == "succeeded"
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert errors == []
        print(f"\n{count[0]} predictions through a Redis outage, 0 failed")


@pytest.mark.timeout(180)
def test_killing_one_replica_costs_the_other_nothing(fleet: Fleet) -> None:
    doomed, survivor = fleet.replica(workers=1), fleet.replica(workers=0)
    with survivor.client() as http:
        with doomed.client() as d:
            wait_job(d, d.post("/fit", json=TUTORIAL).json()["id"])
        wait_until(lambda: http.get("/model").status_code == 200, 5, "model on replica 2")
        stop, errors, count = threading.Event(), list[str](), [0]
        threads = [
            threading.Thread(target=_hammer, args=(survivor.url, stop, errors, count))
            for _ in range(20)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            os.killpg(doomed.proc.pid, signal.SIGKILL)  # the replica and its worker
            doomed.proc.wait(10)
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert errors == []
        assert count[0] > 0
        print(f"\n{count[0]} predictions on replica 2 while replica 1 was killed, 0 failed")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.timeout(180)
def test_an_embedded_worker_hands_its_fit_back_when_its_replica_is_killed(fleet: Fleet) -> None:
    doomed = fleet.replica(workers=1)
    (worker,) = named_descendants(doomed.proc.pid, "sgd-worker")
    with doomed.client() as http:
        job_id = http.post("/fit", json=SECONDS).json()["id"]
        started(http, job_id)
    doomed.proc.kill()  # the replica alone, not its worker
    doomed.proc.wait(10)
    wait_until(lambda: gone(worker), 20, "the orphaned worker to exit")
    other = fleet.replica(workers=1)
    with other.client() as http:
        done = wait_job(http, job_id, deadline=120)
    assert (done["status"], done["attempts"]) == ("succeeded", 2)


@pytest.mark.timeout(180)
def test_a_killed_embedded_worker_is_forked_again_and_its_fit_runs_again(fleet: Fleet) -> None:
    """The replica's own worker, killed with -9 mid-fit: the replica forks another from its
    fork server (no new interpreter), and that one runs the fit again once the lease is out."""
    srv = fleet.replica(workers=1)
    (forkserver,) = named_descendants(srv.proc.pid, "sgd-forkserver")
    (first,) = named_descendants(forkserver, "sgd-worker")
    with srv.client() as http:
        job_id = http.post("/fit", json=SECONDS).json()["id"]
        started(http, job_id)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: gone(first), 20, "the killed worker to exit")
        wait_until(
            lambda: named_descendants(forkserver, "sgd-worker") not in ([], [first]),
            30,
            "a new worker forked from the same fork server",
        )
        done = wait_job(http, job_id, deadline=120)
        assert (done["status"], done["attempts"]) == ("succeeded", 2)
        assert http.get("/readyz").status_code == 200
    assert "restarting" in srv.log()


@pytest.mark.timeout(240)
def test_restarting_redis_and_every_replica_keeps_every_version_job_and_history(
    fleet: Fleet,
) -> None:
    srv = fleet.replica(workers=1)
    with srv.client() as http:
        jobs = [
            wait_job(http, http.post("/fit", json={**TUTORIAL, "seed": 3}).json()["id"]),
            wait_job(
                http, http.post("/fit", json={**TUTORIAL, "fit_intercept": True}).json()["id"]
            ),
        ]
        before = _snapshot(http, [j["id"] for j in jobs])
    srv.stop()
    # and a 202'd job that no worker has run yet
    idle = fleet.replica(workers=0)
    with idle.client() as http:
        pending = http.post("/fit", json={**TUTORIAL, "seed": 5}).json()["id"]
    idle.stop()
    fleet.redis.stop()  # SIGTERM; with appendfsync always every write is on disk already
    fleet.redis.start()
    again = fleet.replica(workers=0)
    with again.client() as http:
        assert _snapshot(http, [j["id"] for j in jobs]) == before
        assert http.get(f"/jobs/{pending}").json()["status"] == "queued"
        fleet.worker()
        done = wait_job(http, pending)
        assert done["status"] == "succeeded"
        assert done["result"]["model_version"] == before["model"]["version"] + 1


def _snapshot(http: httpx.Client, job_ids: list[str]) -> dict[str, Any]:
    return {
        "model": http.get("/model").json(),
        "jobs": [http.get(f"/jobs/{j}").json() for j in job_ids],
        "histories": [http.get("/history", params={"job_id": j}).json() for j in job_ids],
    }


@pytest.mark.timeout(180)
def test_a_replica_started_without_redis_is_ready_once_redis_is_back(fleet: Fleet) -> None:
    first = fleet.replica(workers=1)
    with first.client() as http:
        model = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])["result"]
    first.stop()
    fleet.redis.stop()
    srv = fleet.replica(workers=0, ready=False)
    with srv.client() as http:
        wait_until(lambda: _answers(http), 60, "the replica answers")
        assert http.get("/readyz").status_code == 503
        assert http.get("/predict", params={"hours": 4}).status_code == 503  # no model read yet
        fleet.redis.start()
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, "ready")
        assert http.get("/model").json()["version"] == model["model_version"]


@pytest.mark.timeout(120)
def test_a_redis_with_a_password(tmp_path: Path, make_server: Callable[..., Server]) -> None:
    redis = RedisServer(str(tmp_path), password="pa:ss/w@rd")
    redis.start()
    try:
        bad = make_server(ready=False, SGD_REDIS_URL=redis.url.replace("pa%3Ass", "nope"))
        good = make_server(SGD_REDIS_URL=redis.url, SGD_REDIS_PREFIX=redis.prefix())
        with good.client() as http:
            assert wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])["attempts"] == 1
        with bad.client() as http:
            wait_until(lambda: _answers(http), 60, "the replica answers")
            answer = http.get("/readyz").json()
            assert answer["type"] == "store-unavailable"
        for srv, secret in ((good, "pa%3Ass"), (bad, "nope")):
            assert secret not in srv.log()  # a password is never logged
    finally:
        redis.stop(signal.SIGKILL)


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
