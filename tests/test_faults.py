"""Faults against a real server: its training worker killed at random moments, Ctrl-C to the
whole process group, and a worker that cannot start at all.

`make test` runs FAULT_ROUNDS kills (20); `make faults` runs 200 (SGD_FAULT_ROUNDS).
"""

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import (
    TIMEOUT,
    TUTORIAL,
    Server,
    alive,
    named_descendants,
    wait_job,
    wait_until,
)

ROUNDS = int(os.environ.get("SGD_FAULT_ROUNDS", "20"))
GRACE_SECONDS = 20.0  # a drained stop ends well inside compose's stop_grace_period (40 s)
# About a second of work in the worker.
MEDIUM = {**TUTORIAL, "epochs": 1_000_000, "batch_size": 8, "learning_rate": 0.001}
# Minutes of work, whatever the engine: each epoch draws 100,000 samples.
LONG = {"x": [1.0] * 100_000, "y": [2.0] * 100_000, "batch_size": 100_000, "epochs": 1_000_000}


def worker_pids(server_pid: int) -> list[int]:
    """The live training workers of a server (forked by its fork server, a child of it)."""
    return named_descendants(server_pid, "sgd-worker")


def ready_worker(srv: Server, http: httpx.Client, not_pid: int = 0) -> int:
    """Wait until the server is ready with one live worker (not `not_pid`); its pid."""
    pids: list[int] = []

    def check() -> bool:
        nonlocal pids
        pids = [p for p in worker_pids(srv.proc.pid) if p != not_pid]
        return len(pids) == 1 and http.get("/readyz").status_code == 200

    wait_until(check, 60.0, "a ready server with one new worker")
    return pids[0]


def post(http: httpx.Client, body: dict[str, Any]) -> str:
    r = http.post("/fit", json=body)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def wait_running(http: httpx.Client, job_id: str) -> None:
    def running() -> bool:
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return bool(job["status"] == "running" and job["progress"]["epoch"] > 0)

    wait_until(running, 60.0, f"job {job_id} running")


@pytest.mark.timeout(120 + 20 * ROUNDS)
def test_kill_the_worker_at_random_moments(make_server: Callable[..., Server]) -> None:
    """During fits, between fits and racing a cancel: each job ends as it should, readiness
    comes back, the next fit succeeds, and SIGTERM still stops the server in time."""
    srv = make_server(SGD_DRAIN_SECONDS="0.5")
    seed = int(os.environ.get("SGD_FAULT_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    kinds = {"during a fit": 0, "while idle": 0, "racing a cancel": 0}
    started = time.monotonic()
    with srv.client() as http:
        pid = ready_worker(srv, http)
        for round_ in range(ROUNDS):
            kind = rng.choice(list(kinds))
            kinds[kind] += 1
            where = f"round {round_} ({kind}), SGD_FAULT_SEED={seed}"
            if kind == "during a fit":
                job_id = post(http, MEDIUM)
                wait_running(http, job_id)
                time.sleep(rng.uniform(0, 1.0))
                os.kill(pid, signal.SIGKILL)
                job = wait_job(http, job_id)
                assert job["status"] == "succeeded", (where, job)
                assert job["attempts"] in (1, 2), (where, job)  # 1: it had ended before the kill
            elif kind == "while idle":
                os.kill(pid, signal.SIGKILL)
                time.sleep(rng.uniform(0, 0.05))
                job = wait_job(http, post(http, TUTORIAL))
                assert job["status"] == "succeeded", (where, job)
            else:
                job_id = post(http, LONG)
                wait_running(http, job_id)
                cancel = threading.Thread(target=http.post, args=(f"/jobs/{job_id}/cancel",))
                if rng.random() < 0.5:
                    cancel.start()
                    time.sleep(rng.uniform(0, 0.02))
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(rng.uniform(0, 0.02))
                    cancel.start()
                cancel.join(TIMEOUT + 15)
                job = wait_job(http, job_id)
                assert job["status"] == "cancelled", (where, job)
            pid = ready_worker(srv, http, not_pid=pid)
            after = wait_job(http, post(http, TUTORIAL))
            assert after["status"] == "succeeded", (where, after)
            assert after["attempts"] == 1, (where, after)
    took = time.monotonic() - started
    print(f"{ROUNDS} kills in {took:.1f}s ({took / ROUNDS:.2f}s a round): {kinds}")
    assert srv.stop(signal.SIGTERM, timeout=GRACE_SECONDS) == 0
    log = srv.log()
    assert "Traceback" not in log
    assert log.count("training worker ready") == ROUNDS + 1


@pytest.mark.timeout(180)
def test_killing_the_fork_server_loses_no_fit(make_server: Callable[..., Server]) -> None:
    """The process workers are forked from dies with -9, mid-fit and then while idle: the fit
    runs again on a worker from a new fork server, and the server stays up and ready."""
    srv = make_server(SGD_DRAIN_SECONDS="0.5")
    with srv.client() as http:
        pid = ready_worker(srv, http)
        (forkserver,) = named_descendants(srv.proc.pid, "sgd-forkserver")
        job_id = post(http, MEDIUM)
        wait_running(http, job_id)
        os.kill(forkserver, signal.SIGKILL)
        job = wait_job(http, job_id)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job
        wait_until(lambda: not alive(pid), 10.0, "the orphaned worker's exit")
        pid = ready_worker(srv, http, not_pid=pid)
        (forkserver,) = named_descendants(srv.proc.pid, "sgd-forkserver")
        os.kill(forkserver, signal.SIGKILL)
        ready_worker(srv, http, not_pid=pid)
        wait_until(lambda: not alive(pid), 10.0, "the orphaned worker's exit")
        after = wait_job(http, post(http, TUTORIAL))
        assert after["status"] == "succeeded", after
        assert after["attempts"] == 1, after
    assert len(named_descendants(srv.proc.pid, "sgd-worker")) == 1
    assert len(named_descendants(srv.proc.pid, "sgd-forkserver")) == 1
    assert srv.stop(signal.SIGTERM, timeout=GRACE_SECONDS) == 0
    assert "Traceback" not in srv.log()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_cancels_the_fit_and_stops(
    make_server: Callable[..., Server], sig: int
) -> None:
    """Ctrl-C in a terminal, or systemd's KillMode=control-group, signals the worker too."""
    srv = make_server(SGD_DRAIN_SECONDS="2")
    with srv.client() as http:
        job_id = post(http, LONG)
        wait_running(http, job_id)
        signalled = time.monotonic()
        os.killpg(srv.proc.pid, sig)
        wait_until(lambda: http.get(f"/jobs/{job_id}").json()["status"] != "running", 2.0)
        job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled", job
    assert job["attempts"] == 1
    assert srv.proc.wait(GRACE_SECONDS) == 0
    # No new worker during the stop: it took the drain time and little more.
    assert time.monotonic() - signalled < 2.0 + 3.0
    log = srv.log()
    assert log.count("training worker ready") == 1
    assert "worker-crashed" not in log
    assert "Traceback" not in log


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_start_makes_the_server_exit_non_zero(
    make_server: Callable[..., Server], tmp_path: Any
) -> None:
    """A broken torch install: the replica never says ready and exits 1 for its supervisor."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken torch install')\n")
    srv = make_server(False, SGD_DRAIN_SECONDS="1", PYTHONPATH=str(broken.parent))
    answers: set[int] = set()
    while srv.proc.poll() is None:
        try:
            answers.add(httpx.get(f"{srv.url}/readyz", timeout=TIMEOUT).status_code)
            assert httpx.get(f"{srv.url}/healthz", timeout=TIMEOUT).status_code == 200
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    assert srv.proc.wait(60) == 1
    assert answers == {503}
    log = srv.log()
    assert "failed to start 5 times in a row" in log
    assert "exiting with 1" in log
