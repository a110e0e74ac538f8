"""End to end: SIGTERM (what `docker stop` sends) to a real server in the middle of a fit."""

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TIMEOUT, TUTORIAL, Server, start_server, wait_job, wait_until

DRAIN_SECONDS = 6.0
# docker-compose.yml's stop_grace_period is 40 s; a drained stop must end well inside it.
GRACE_SECONDS = 20.0
# Runs for minutes whatever the engine: each epoch draws 100,000 samples with replacement.
LONG_FIT = {"x": [1.0] * 100_000, "y": [2.0] * 100_000, "batch_size": 100_000, "epochs": 1_000_000}
SLOW_HOURS = [4.0] * 200


@pytest.fixture
def draining_server(tmp_path: Any) -> Iterator[Server]:
    """A real server with a drain window long enough to observe; killed if a test leaves it up."""
    srv = start_server(str(tmp_path), SGD_DRAIN_SECONDS=str(DRAIN_SECONDS))
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(10)


def status_of(http: httpx.Client, job_id: str) -> str:
    status: str = http.get(f"/jobs/{job_id}").json()["status"]
    return status


def start_long_fit(http: httpx.Client) -> str:
    r = http.post("/fit", json=LONG_FIT)
    assert r.status_code == 202
    job_id: str = r.json()["id"]
    wait_until(lambda: status_of(http, job_id) == "running", what="the long fit running")
    return job_id


class SlowPredict(threading.Thread):
    """POST /predict with a body uploaded over `seconds`: a request in flight across a SIGTERM."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(name="slow-predict", daemon=True)
        self.url = url
        self.seconds = seconds
        self.sending = threading.Event()  # set once the request is under way
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def body(self) -> Iterator[bytes]:
        data = json.dumps({"hours": SLOW_HOURS}).encode()
        parts = 10
        step = -(-len(data) // parts)
        for i in range(0, len(data), step):
            yield data[i : i + step]
            self.sending.set()
            time.sleep(self.seconds / parts)

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=self.seconds + TIMEOUT) as http:
                self.response = http.post(
                    "/predict", content=self.body(), headers={"Content-Type": "application/json"}
                )
        except BaseException as exc:  # reported by the test's assertions, not lost in the thread
            self.error = exc


def test_sigterm_mid_fit_drains_cancels_and_stops(draining_server: Server) -> None:
    srv = draining_server
    with srv.client() as http:
        tutorial = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        assert tutorial["status"] == "succeeded"
        served = http.get("/predict", params={"hours": 4}).json()
        job_id = start_long_fit(http)
        jobs_before = [j["id"] for j in http.get("/jobs").json()["jobs"]]

        # In flight from before the SIGTERM until after the drain window has ended.
        slow = SlowPredict(srv.url, seconds=DRAIN_SECONDS + 2)
        slow.start()
        assert slow.sending.wait(TIMEOUT)

        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        # Everything below must be seen while the server still answers, i.e. in the drain window.
        wait_until(lambda: http.get("/readyz").status_code == 503, DRAIN_SECONDS, "/readyz 503")
        ready = http.get("/readyz")
        assert ready.headers["content-type"] == "application/problem+json"
        assert ready.json()["type"] == "not-ready"
        assert http.get("/healthz").json() == {"status": "ok"}  # alive, just not taking work

        refused = http.post("/fit", json=TUTORIAL)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "shutting-down"
        assert [j["id"] for j in http.get("/jobs").json()["jobs"]] == jobs_before

        wait_until(lambda: status_of(http, job_id) != "running", DRAIN_SECONDS, "the fit stopping")
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] == "cancelled"
        assert 0 < job["progress"]["epoch"] < LONG_FIT["epochs"]
        assert job["finished_at"] is not None
        assert job["result"] is None
        # Still draining: the cancellation was observed inside the window, not after it.
        assert http.get("/readyz").status_code == 503
        # The fit that was cancelled did not replace the served model.
        assert http.get("/predict", params={"hours": 4}).json() == served

    code = srv.proc.wait(GRACE_SECONDS)
    stopped_after = time.monotonic() - signalled
    assert DRAIN_SECONDS <= stopped_after < GRACE_SECONDS

    slow.join(TIMEOUT)
    assert not slow.is_alive()
    assert slow.error is None, repr(slow.error)
    assert slow.response is not None
    assert slow.response.status_code == 200
    assert slow.response.json() == {
        "scores": [served["score"]] * len(SLOW_HOURS),
        "model_version": served["model_version"],
    }

    log = srv.log()
    assert "draining" in log
    assert "Traceback" not in log
    assert code == 0  # ended by itself, cleanly


def test_sigterm_mid_fit_exits_0(draining_server: Server) -> None:
    with draining_server.client() as http:
        start_long_fit(http)
    assert draining_server.stop(signal.SIGTERM, timeout=GRACE_SECONDS) == 0
