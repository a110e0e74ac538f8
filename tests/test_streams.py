"""Event streams are bounded (issue 26, point 4), against a real server: a replica holds at most
SGD_MAX_STREAMS in all and SGD_MAX_JOB_STREAMS per job, and a stream waiting on a job that does
not change costs the server nothing (it waits on the store's notice, not on a 50 ms timer).

Before: each subscriber read the store through the threadpool every 50 ms whatever happened;
1,000 subscribers (no token) took 87% of a core, and nothing capped them.
"""

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from tests.conftest import TIMEOUT, Server, slow_fit, wait_until

pytestmark = pytest.mark.timeout(180)

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


@contextmanager
def _subscribed(srv: Server, job_id: str) -> Iterator[socket.socket]:
    """An open event stream of `job_id` (its first bytes read), as a raw socket."""
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:300]
        yield s


def _status(http: httpx.Client, path: str) -> int:
    with http.stream("GET", path) as r:  # a 200 streams on: its status is enough
        return r.status_code


def _fits(srv: Server, http: httpx.Client, count: int) -> list[str]:
    """`count` fits that will not end during the test: one running, the others queued."""
    ids = [http.post("/fit", json=slow_fit()).json()["id"] for _ in range(count)]
    wait_until(lambda: http.get(f"/jobs/{ids[0]}").json()["status"] == "running")
    return ids


def test_streams_past_the_caps_get_a_503(make_server: Callable[..., Server]) -> None:
    srv = make_server(SGD_MAX_EPOCHS="2000000", SGD_MAX_STREAMS="4", SGD_MAX_JOB_STREAMS="2")
    with srv.client() as http, ExitStack() as held:
        a, b, c = _fits(srv, http, 3)
        try:
            for job in (a, a):
                held.enter_context(_subscribed(srv, job))
            r = http.get(f"/jobs/{a}/events")
            assert r.status_code == 503
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["retry-after"] == "5"
            assert r.json()["type"] == "too-many-streams"
            assert "SGD_MAX_JOB_STREAMS=2" in r.json()["detail"]
            for job in (b, b):
                held.enter_context(_subscribed(srv, job))
            r = http.get(f"/jobs/{c}/events")
            assert r.status_code == 503
            assert "SGD_MAX_STREAMS=4" in r.json()["detail"]
            held.close()  # the streams end with their connections, and their places are free
            wait_until(lambda: _status(http, f"/jobs/{c}/events") == 200)
        finally:
            for job in (a, b, c):
                http.post(f"/jobs/{job}/cancel")


def test_a_stream_of_a_job_that_does_not_change_costs_nothing(
    make_server: Callable[..., Server],
) -> None:
    """200 streams of a queued job: the server's CPU over three seconds stays near idle (each
    wakes for a keep-alive every 2.5 s). Before, 200 x 20 reads a second took most of a core."""
    srv = make_server(SGD_MAX_EPOCHS="2000000", SGD_MAX_STREAMS="1000", SGD_MAX_JOB_STREAMS="1000")
    with srv.client() as http, ExitStack() as held:
        running, queued = _fits(srv, http, 2)
        try:
            for _ in range(200):
                held.enter_context(_subscribed(srv, queued))
            time.sleep(0.5)
            before, start = _cpu_seconds(srv.proc.pid), time.monotonic()
            time.sleep(3)
            busy = (_cpu_seconds(srv.proc.pid) - before) / (time.monotonic() - start)
            assert busy < 0.1, f"the server used {busy:.0%} of a core for 200 waiting streams"
        finally:
            for job in (running, queued):
                http.post(f"/jobs/{job}/cancel")
