"""Who may do what (service.http.access), against real servers: scoped tokens from SGD_TOKENS_FILE,
rotated without a restart; SGD_API_TOKEN as before; writes from other sites' pages refused.

Before (issue 26, point 6): without a token, a cross-site form `POST /models/1/serve` rolled
the served model back; and there was one token, for writes only, so reads could not be closed.
"""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.http.access import SCOPES
from tests.conftest import TIMEOUT, TUTORIAL, Server, wait_job, wait_until

pytestmark = pytest.mark.timeout(180)

PROBLEM = "application/problem+json"


def new_token(name: str, scopes: str) -> tuple[str, dict[str, Any]]:
    """`sgd-service token`: the secret, and its entry for the tokens file."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "token", "--name", name, "--scopes", scopes],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    secret, entry = done.stdout.splitlines()
    return secret, json.loads(entry)


def write_tokens(path: Path, *entries: dict[str, Any]) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(json.dumps({"tokens": list(entries)}))
    temporary.replace(path)  # as an operator would: never a half-written file


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_problem(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = r.json()
    assert problem["type"] == kind, problem
    return problem


@pytest.fixture(scope="module")
def tokens() -> dict[str, tuple[str, dict[str, Any]]]:
    return {scope: new_token(f"{scope}-client", scope) for scope in SCOPES}


def test_closed_scopes_need_a_token_that_holds_them(
    make_server: Callable[..., Server],
    tmp_path: Path,
    tokens: dict[str, tuple[str, dict[str, Any]]],
) -> None:
    path = tmp_path / "tokens.json"
    write_tokens(path, *(entry for _, entry in tokens.values()))
    srv = make_server(SGD_TOKENS_FILE=str(path), SGD_OPEN_SCOPES="none")
    secret = {scope: secret for scope, (secret, _) in tokens.items()}
    with srv.client() as http:
        assert_problem(http.post("/fit", json=TUTORIAL), 401, "unauthorized")
        r = http.post("/fit", json=TUTORIAL, headers=bearer(secret["read"]))
        problem = assert_problem(r, 403, "insufficient-scope")
        assert problem["scope"] == "train"
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        job = http.post("/fit", json=TUTORIAL, headers=bearer(secret["train"]))
        assert job.status_code == 202
        assert_problem(http.get(f"/jobs/{job.json()['id']}"), 401, "unauthorized")
        reader = httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=bearer(secret["read"]))
        with reader:
            wait_job(reader, job.json()["id"])
            for path_ in ("/jobs", "/models", "/history", "/metrics", "/model"):
                assert reader.get(path_).status_code == 200, path_
            assert_problem(reader.get("/predict?hours=4"), 403, "insufficient-scope")
        # predictions: the fast path steps aside, the route checks
        assert_problem(http.get("/predict?hours=4"), 401, "unauthorized")
        r = http.get("/predict?hours=4", headers=bearer(secret["predict"]))
        assert r.status_code == 200
        assert r.json()["score"] == pytest.approx(8, abs=0.1)
        infer = {"inputs": [{"name": "hours", "datatype": "FP64", "shape": [1], "data": [4]}]}
        assert http.post("/v2/models/sgd/infer", json=infer).status_code == 401
        ok = http.post("/v2/models/sgd/infer", json=infer, headers=bearer(secret["predict"]))
        assert ok.status_code == 200
        # serving a version is admin's
        assert_problem(
            http.post("/models/1/serve", headers=bearer(secret["train"])), 403, "insufficient-scope"
        )
        assert http.post("/models/1/serve", headers=bearer(secret["admin"])).status_code == 200
        # open by design: health, the page
        for open_path in ("/healthz", "/readyz", "/", "/v2/health/live"):
            assert http.get(open_path).status_code == 200, open_path
        spec = http.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/jobs"]["get"]["security"] == [{"bearer": ["read"]}]
        assert "401" in spec["paths"]["/jobs"]["get"]["responses"]


def test_a_token_file_is_read_again_when_it_changes(
    make_server: Callable[..., Server],
    tmp_path: Path,
    tokens: dict[str, tuple[str, dict[str, Any]]],
) -> None:
    """Rotation without a restart: the new token joins the old, then the old leaves."""
    old_secret, old = new_token("ci", "train,read")
    new_secret, new = new_token("ci-next", "train,read")
    path = tmp_path / "tokens.json"
    write_tokens(path, old)
    srv = make_server(SGD_TOKENS_FILE=str(path))

    def status(secret: str) -> int:
        with srv.client() as http:
            return http.post("/models/999/serve", headers=bearer(secret)).status_code

    # 404: the token is good (version 999 does not exist); 401: it is not
    assert status(old_secret) == 403  # train, read: not admin
    assert status(new_secret) == 401
    write_tokens(path, old, new)
    wait_until(lambda: status(new_secret) == 403, what="the new token taken")
    assert status(old_secret) == 403  # both valid at once
    write_tokens(path, new)
    wait_until(lambda: status(old_secret) == 401, what="the old token dropped")
    path.write_text("{not json")  # a bad file keeps the last good tokens, and says so
    wait_until(  # read at a request's check, at most once a second
        lambda: status(new_secret) == 403 and "keeping its last tokens" in srv.log(),
        what="the bad file logged, the last good tokens kept",
    )
    with srv.client() as http:  # SGD_OPEN_SCOPES' default: reads and predictions stay open
        assert http.get("/jobs").status_code == 200


def test_a_bad_tokens_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "x", "sha256": "abc", "scopes": ["read"]}]}))
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        env={"SGD_TOKENS_FILE": str(path), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("sgd-service: cannot start: ")
    assert "tokens.0.sha256" in done.stderr


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
    ],
)
def test_a_write_from_another_site_is_refused(
    shared_server: Server, headers: dict[str, str]
) -> None:
    """No token is set on this server: only the browser's own headers tell the site apart."""
    port = shared_server.url.rsplit(":", 1)[1]
    sent = {k: v.format(port=port) for k, v in headers.items()}
    with shared_server.client() as http:
        first = wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        version = first["result"]["model_version"]
        wait_job(http, http.post("/fit", json=TUTORIAL).json()["id"])
        served = http.get("/model").json()["version"]
        assert served != version
        before = http.get("/jobs").json()["jobs"]
        for method, path in [("POST", f"/models/{version}/serve"), ("POST", "/fit")]:
            r = http.request(method, path, json=TUTORIAL, headers=sent)
            assert_problem(r, 403, "cross-site-write")
        assert http.get("/model").json()["version"] == served  # nothing rolled back
        assert http.get("/jobs").json()["jobs"] == before  # and no fit started
        # reads from anywhere are not writes
        assert http.get("/jobs", headers=sent).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, another service
        {"Origin": "http://127.0.0.1:{port}"},  # the service's own page
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
    ],
)
def test_a_write_from_the_page_or_a_program_is_taken(
    shared_server: Server, headers: dict[str, str]
) -> None:
    port = shared_server.url.rsplit(":", 1)[1]
    sent = {k: v.format(port=port) for k, v in headers.items()}
    with shared_server.client() as http:
        r = http.post("/fit", json=TUTORIAL, headers=sent)
        assert r.status_code == 202, r.text
        wait_job(http, r.json()["id"])
