"""The plot queue is bounded and drops work whose caller left (issue 26, point 7), on a real
server: its own metrics count what was drawn (200), dropped (499) and refused (503).

Before: every plot request was drawn, in order, whether or not its caller was still there;
after 100 abandoned plot requests a normal one took 10.97 s instead of 117 ms.
"""

import re
import socket
import time
from collections.abc import Callable

import pytest

from service.http.plotter import MAX_WAITING
from tests.conftest import TIMEOUT, TUTORIAL, Server, wait_job, wait_until

pytestmark = pytest.mark.timeout(180)

ABANDONED = 30


def _plots(srv: Server) -> dict[str, float]:
    """GET /history/plot requests so far, by status, from the server's own metrics."""
    with srv.client() as http:
        text = http.get("/metrics").text
    pattern = r'sgd_http_requests_total\{method="GET",route="/history/plot",status="(\d+)"\} (\S+)'
    return {status: float(n) for status, n in re.findall(pattern, text)}


def test_plots_whose_callers_left_are_not_drawn(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    with srv.client() as http:
        wait_job(http, http.post("/fit", json={**TUTORIAL, "epochs": 100_000}).json()["id"])
        assert http.get("/history/plot?format=svg").status_code == 200  # the process is up
    host, port = srv.url.removeprefix("http://").split(":")
    callers = []
    for _ in range(ABANDONED):
        s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        s.sendall(b"GET /history/plot?format=svg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        callers.append(s)
    time.sleep(0.05)  # each request is in
    for s in callers:
        s.close()
    wait_until(lambda: sum(_plots(srv).values()) >= ABANDONED + 1, what="every request answered")
    counts = _plots(srv)
    drawn = counts.get("200", 0) - 1
    assert drawn <= MAX_WAITING + 1, counts  # those begun before their callers were gone
    assert counts.get("499", 0) + counts.get("503", 0) >= ABANDONED - MAX_WAITING - 1, counts
    with srv.client() as http:  # and the next caller is drawn at once
        assert http.get("/history/plot?format=svg").status_code == 200


def test_plots_past_the_queue_get_a_503(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    with srv.client() as http:
        wait_job(http, http.post("/fit", json={**TUTORIAL, "epochs": 100_000}).json()["id"])
        assert http.get("/history/plot").status_code == 200
    host, port = srv.url.removeprefix("http://").split(":")
    callers = [socket.create_connection((host, int(port)), timeout=TIMEOUT) for _ in range(12)]
    for s in callers:
        s.sendall(b"GET /history/plot HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answers = []
    for s in callers:
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        s.close()
        answers.append(answer)
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert refused, [a[:40] for a in answers]
    assert all(b"too-many-plots" in a and b"retry-after: 1" in a for a in refused)
    assert all(a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")) for a in answers)
