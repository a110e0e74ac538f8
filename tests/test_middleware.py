"""The Host check and the security headers, on a real server (the body limit: test_problems)."""

import socket
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.core.settings import Settings
from service.http.app import create_app
from service.http.middleware import DOCS_CSP, PAGE_CSP
from tests.conftest import TIMEOUT, TUTORIAL, Server, wait_job

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def default_server(default_server: Server) -> Server:
    """The run's shared server (default SGD_ALLOWED_HOSTS), with a model to predict with."""
    with default_server.client() as http:
        wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
    return default_server


def port(srv: Server) -> str:
    return srv.url.rsplit(":", 1)[1]


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:{port}",
        "LOCALHOST:{port}",
        "127.0.0.1:{port}",
        "[::1]:{port}",
        "[::1]",
    ],
)
def test_the_loopback_names_are_answered(default_server: Server, host: str) -> None:
    headers = {"Host": host.format(port=port(default_server))}
    with default_server.client() as http:
        assert http.get("/predict?hours=4", headers=headers).status_code == 200  # the fast path
        assert http.get("/model", headers=headers).status_code == 200
        assert http.get("/", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "host",
    ["rebound.example", "rebound.example:{port}", "localhost.rebound.example", "127.0.0.2"],
)
def test_any_other_host_gets_a_problem(default_server: Server, host: str) -> None:
    """A page on another site, its name rebound to 127.0.0.1, reads and changes nothing."""
    headers = {"Host": host.format(port=port(default_server))}
    with default_server.client() as http:
        for method, path, body in [
            ("GET", "/predict?hours=4", None),  # the fast path too
            ("POST", "/fit", TUTORIAL),
            ("GET", "/", None),
            ("GET", "/jobs", None),
        ]:
            r = http.request(method, path, json=body, headers=headers)
            assert r.status_code == 400
            assert r.headers["content-type"] == PROBLEM
            problem = r.json()
            assert problem["type"] == "host-not-allowed"
            assert problem["status"] == 400
            assert "SGD_ALLOWED_HOSTS" in problem["detail"]
        assert http.get("/jobs").json()["jobs"][0]["n_samples"] == 3  # no fit was started


@pytest.mark.parametrize(
    "host",
    [
        "[::1]evil.com",  # before: answered, the text after the bracket ignored
        "[::1]:{port}evil.com",
        "[::1]:{port}:{port}",
        "localhost:{port}:{port}",
        "localhost:",
        "localhost:port",
        "local host",
        "[localhost]",  # brackets only around an IPv6 address
        "[::1::1]",
        "127.0.0.1@evil.com",
        "[::1",
        "::1",  # an IPv6 address without its brackets
    ],
)
def test_a_host_that_is_not_a_name_with_a_port_gets_a_problem(
    default_server: Server, host: str
) -> None:
    headers = {"Host": host.format(port=port(default_server))}
    with default_server.client() as http:
        for path in ("/predict?hours=4", "/model"):
            r = http.get(path, headers=headers)
            assert r.status_code == 400, (host, path)
            assert r.json()["type"] == "host-not-allowed"


def _raw(srv: Server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(port(srv))), TIMEOUT) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("path", [b"/predict?hours=4", b"/model"])
def test_two_host_headers_get_a_problem(default_server: Server, path: bytes) -> None:
    """Before: the first of two Host headers won; RFC 9112 answers 400."""
    answer = _raw(
        default_server,
        b"GET %s HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n" % path,
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"exactly one Host header, not 2" in answer


def test_a_request_without_host_gets_a_problem(default_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", int(port(default_server))), TIMEOUT) as s:
        s.sendall(b"GET /model HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"host-not-allowed" in answer


def test_a_star_answers_any_host_and_a_wildcard_its_subdomains(
    make_server: Callable[..., Server],
) -> None:
    anyone = make_server(SGD_ALLOWED_HOSTS="*")
    with anyone.client() as http:
        assert http.get("/healthz", headers={"Host": "rebound.example"}).status_code == 200
    some = make_server(SGD_ALLOWED_HOSTS="127.0.0.1, api.internal, *.example.com")
    with some.client() as http:
        for host, status in [
            ("api.internal:8000", 200),
            ("a.example.com", 200),
            ("b.a.example.com", 200),
            ("example.com", 400),
            ("localhost", 400),  # the list replaces the default
            ("evil-example.com", 400),
        ]:
            assert http.get("/healthz", headers={"Host": host}).status_code == status, host


def test_the_setting_is_a_comma_separated_list() -> None:
    assert Settings(allowed_hosts="Example.COM, [::1] ,*").allowed_hosts == (  # type: ignore[arg-type]
        "example.com",
        "::1",
        "*",
    )
    with pytest.raises(ValidationError, match="comma-separated list of host names"):
        Settings(allowed_hosts="a,,b")  # type: ignore[arg-type]


def test_a_misconfigured_list_stops_start_up() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        env={"SGD_ALLOWED_HOSTS": "a,,b", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("sgd-service: cannot start: SGD_ALLOWED_HOSTS='a,,b'")


# -- security headers -------------------------------------------------------------------------


def test_the_page_and_its_assets_carry_security_headers(client: TestClient) -> None:
    for path in ("/", "/static/page.js", "/static/page.css", "/jobs", "/static/nope.js"):
        r = client.get(path)
        assert r.headers["content-security-policy"] == PAGE_CSP, path
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in PAGE_CSP  # no inline script on the page
    for path in ("/docs", "/redoc"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.headers["content-security-policy"] == DOCS_CSP
        assert r.headers["x-frame-options"] == "DENY"


def test_the_page_has_no_inline_script_or_style(client: TestClient) -> None:
    html = client.get("/").text
    assert "<script>" not in html
    assert "<script src=" in html
    assert " style=" not in html
    assert "<style" not in html


def test_every_answer_carries_them(default_server: Server) -> None:
    """Before: the Host check's 400, both 413s and the fast path's answers went without them
    (the header layer sat inside the others)."""
    big = b"0" * (65 * 1024 * 1024)
    with default_server.client() as http:
        answers = {
            "fast path": http.get("/predict?hours=4"),
            "host 400": http.get("/model", headers={"Host": "rebound.example"}),
            "host 400, fast path": http.get("/predict?hours=4", headers={"Host": "x.example"}),
            "413 by length": http.post("/fit", content=big),
            "413 streamed": http.post("/fit", content=iter([big])),
        }
    assert answers["fast path"].status_code == 200
    for name, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("content-security-policy") == PAGE_CSP, name
        assert r.headers.get("x-frame-options") == "DENY", name
        assert r.headers.get("referrer-policy") == "no-referrer", name


def test_the_real_server_sends_them_too(default_server: Server) -> None:
    r = httpx.get(f"{default_server.url}/", timeout=TIMEOUT)
    assert r.headers["content-security-policy"] == PAGE_CSP
    assert r.headers["x-frame-options"] == "DENY"


def test_a_bug_is_answered_as_a_problem_with_them() -> None:
    """A bug is answered by Starlette's outermost layer, outside every middleware of ours:
    before, a plain-text 500 without the security headers (Schemathesis found one)."""
    app = create_app(Settings(allowed_hosts=["testserver"]))  # type: ignore[arg-type]

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/broken")
    assert r.status_code == 500
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == "internal"
    assert "a bug" not in r.text  # what failed is in the log, not in the answer
    assert r.headers["content-security-policy"] == PAGE_CSP
    assert r.headers["x-content-type-options"] == "nosniff"
