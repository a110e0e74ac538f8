"""Bounded connections (service.http.connections) against a real server: idle sockets, slow headers
and slow bodies are closed at their deadlines, connections past the cap are refused at once,
and every answer written outside the app is problem+json with the security headers.

Before (issue 26, point 3): idle sockets, half-sent headers and 1-byte-per-10-s bodies were all
still open after 73 s, and with `ulimit -n 256` 300 idle sockets made /predict answer nothing.
"""

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from service.http.connections import SPARE_DESCRIPTORS
from tests.conftest import Server, start_server, stop_shared

pytestmark = pytest.mark.timeout(120)

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1, 2, 8
WAIT = 20.0  # far past every deadline: a socket still open then is never closed
HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        str(tmp_path_factory.mktemp("guarded")),
        SGD_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        SGD_BODY_TIMEOUT=str(BODY_TIMEOUT),
        SGD_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    yield srv
    stop_shared(srv)


def _connect(srv: Server) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT)


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _read_one(s: socket.socket) -> bytes:
    """One whole answer on a kept-alive connection: its head, then Content-Length bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v
            for k, v in (h.split(b": ", 1) for h in head.split(b"\r\n")[1:])
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        body += s.recv(65536)
    assert len(body) == length, "more than one answer"
    return head + b"\r\n\r\n" + body


def _problem(answer: bytes, status: int, kind: str) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % status), answer[:200]
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert b"frame-ancestors 'none'" in headers[b"content-security-policy"]
    problem: dict[str, object] = json.loads(body)
    assert problem["type"] == kind, problem
    assert problem["status"] == status, problem
    return problem


def test_an_idle_connection_is_closed(guarded: Server) -> None:
    with _connect(guarded) as s:
        assert _read_all(s) == b""  # closed without a word: nothing was asked


def test_headers_sent_too_slowly_get_a_408(guarded: Server) -> None:
    with _connect(guarded) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        problem = _problem(_read_all(s), 408, "request-timeout")
    assert "SGD_HEADER_TIMEOUT=1s" in str(problem["detail"])


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_request(
    guarded: Server,
) -> None:
    with _connect(guarded) as s:
        s.sendall(HEAD)
        assert _read_one(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        _problem(_read_all(s), 408, "request-timeout")


def test_a_body_sent_too_slowly_gets_a_408(guarded: Server) -> None:
    head = (
        b"POST /fit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    with _connect(guarded) as s:
        s.sendall(head)
        sent = time.monotonic()
        answer = b""
        # a byte every half second: each arrives well within any idle timeout, the whole never
        while not answer and time.monotonic() - sent < WAIT:
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.5)
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
        s.settimeout(WAIT)
        answer += _read_all(s)
        problem = _problem(answer, 408, "request-timeout")
    assert "SGD_BODY_TIMEOUT=2s" in str(problem["detail"])
    with _connect(guarded) as s:  # and the server is none the worse for it
        s.sendall(HEAD)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_connection_over_the_cap_is_refused_at_once(guarded: Server) -> None:
    held = [_connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # each accepted: the server counts them
        with _connect(guarded) as s:
            s.settimeout(HEADER_TIMEOUT / 2)  # refused before any deadline could close it
            problem = _problem(_read_all(s), 503, "too-many-connections")
        assert "SGD_MAX_CONNECTIONS" in str(problem["detail"])
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    with _connect(guarded) as s:  # room again once they are gone
        s.sendall(HEAD)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_request_that_is_not_http_gets_a_problem(guarded: Server) -> None:
    with _connect(guarded) as s:
        s.sendall(b"HELLO\x00 THERE\r\n\r\n")
        _problem(_read_all(s), 400, "malformed-request")


def test_the_cap_fits_in_the_file_descriptors_the_process_has() -> None:
    """A server out of descriptors cannot even accept a connection to refuse it: the cap stays
    SPARE_DESCRIPTORS below `ulimit -n` whatever SGD_MAX_CONNECTIONS asks for."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "from service.http.connections import connection_cap\n"
        "print(connection_cap(2048), connection_cap(100))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [str(256 - SPARE_DESCRIPTORS), "100"]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_aborted_uploads_are_freed_at_once(shared_server: Server) -> None:
    """Eight uploads of 40 MiB each, cut off mid-body: the server keeps none of them (before
    issue 26 they stayed in reference cycles until a full collection: RSS 555 -> 735 MiB)."""
    head = (
        b"POST /fit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 62000000\r\n\r\n{"x":"'
    )
    part = b"a" * 2**20
    before = _rss_mib(shared_server.proc.pid)
    for _ in range(8):
        with _connect(shared_server) as s:
            s.sendall(head)
            for _ in range(40):
                s.sendall(part)
        time.sleep(0.2)
    with _connect(shared_server) as s:  # answered, so every cut upload has been dropped
        s.sendall(HEAD)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    grown = _rss_mib(shared_server.proc.pid) - before
    assert grown < 40, f"the server grew {grown:.0f} MiB for 320 MiB of cut uploads"
