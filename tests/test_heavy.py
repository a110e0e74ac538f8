"""Heavy requests off the hot path (issue 13): what they still answer, and what they must not cost.

POST /fit bodies are parsed in the intake process, counted before they are parsed; GET /history
is written a slice at a time; /history/plot is drawn in a plotting process. The answers must be
the ones FastAPI gave when it did all of it on the event loop: a reference app that still does
(the same FitRequest, checks and handlers, FastAPI's own route) answers every body here too,
and the two must agree. How fast they are is bench/heavy.py's business, not the suite's.
"""

import asyncio
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from service.core.schemas import FitRequest
from service.core.settings import Settings
from service.http import turns
from service.http.bodies import error_of
from service.http.intake import Intake
from service.http.plotter import Plotter
from service.http.problems import install_handlers
from service.http.reading import NotJson, NotRead, loads
from service.state.base import Store
from tests.conftest import (
    Server,
    alive,
    named_descendants,
    settings_for_tests,
    wait_job,
    wait_until,
)
from tests.test_properties import bad_bodies

JSON = {"content-type": "application/json"}
MiB = 1024 * 1024


class _UTF8Only(APIRoute):
    """FastAPI's route, refusing what the service refuses before FastAPI's own parser would
    read it (service.http.reading.loads): a body that is not UTF-8, integers too long for int(),
    nesting too deep for json.loads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            body = await request.body()  # kept by Starlette: FastAPI reads the same bytes
            if body and request.headers.get("content-type") == "application/json":
                try:
                    loads(body)
                except NotRead as e:
                    if not isinstance(e.refused, NotJson):  # FastAPI answers those itself
                        raise error_of(e.refused) from None
            return await handle(request)

        return route


def reference(settings: Settings) -> TestClient:
    """POST /fit as FastAPI parses it on the event loop, with the route's checks."""
    app = FastAPI()
    install_handlers(app)

    async def fit(body: FitRequest) -> dict[str, str]:
        body.check_limits(settings)
        body.check_combinations()
        return {}

    app.router.add_api_route(
        "/fit", fit, methods=["POST"], status_code=202, route_class_override=_UTF8Only
    )
    return TestClient(app)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[TestClient, TestClient]]:
    """The service (memory store) and the reference, with the same limits."""
    s = settings_for_tests(max_samples=50, max_queued_jobs=500, keep_jobs=50)
    from service.http.app import create_app

    with TestClient(create_app(s)) as real, reference(s) as ref:
        yield real, ref


def same_answer(
    pair: tuple[TestClient, TestClient], content: bytes, headers: dict[str, str] = JSON
) -> int:
    real, ref = pair
    ours, theirs = (c.post("/fit", content=content, headers=headers) for c in (real, ref))
    assert ours.status_code == theirs.status_code, (content[:200], ours.text, theirs.text)
    if theirs.status_code != 202:
        assert ours.json() == theirs.json(), content[:200]
        assert ours.headers["content-type"] == "application/problem+json"
    status: int = ours.status_code
    return status


TRICKY = [
    b"",
    b"{",
    b"[",
    b"null",
    b'"x"',
    b"[]",
    b"NaN",
    b'{"x": [1, NaN], "y": [1, 2]}',
    b'{"x": [1, Infinity], "y": [1, 2]}',
    b'{"x": [1e400], "y": [1]}',
    b'{"x": [1], "y": [2], "seed": 123456789012345678901234567890}',
    b'{"x": [1], "y": [2], "epochs": 123456789012345678901234567890}',
    b'{"x": [1], "y": [2], "epochs": 1e3}',
    b'{"x": [1], "y": [2], "epochs": 3.0}',
    b'{"x": [1], "y": [2], "x": [0]}',
    b'{"x": [1, true], "y": [1, 2]}',
    b'{"x": ["1"], "y": [2]}',
    b'{"x": [1], "y": [2], "junk": 1}',
    b'{"x": [1], "y": [2], "init_from": "served", "init_w": 2}',
    b'{"x": [0, 0], "y": [1, 2]}',
    b'{"x": [1, 2], "y": [1]}',
    b'{"x": [1e300], "y": [1]}',
    b'{"x": [1], "y": [2], "publish": "if_better"}',
    b'{"x": [1], "y": [2], "validation_fraction": 0.5}',
    b'{"x": [1], "y": [2], "n_iter_no_change": 3}',
    b'{"x": [1], "y": [2], "init_from": 0}',
    b'{"x": [1], "y": [2], "init_from": "latest"}',
    b'{"x": [' + b"1," * 60 + b'1], "y": [1]}',
    b'"\\ud800"',
    b'{"x": [1], "y": [2], "publish": "\\ud800"}',
    b"\xff\xfe{",
    b"\xef\xbb\xbf{}",
    '{"x": [1], "y": [2]}'.encode("utf-16"),
    b"[" * 10_000,
    b'{"x": [1, 2, 3], "y": [2, 4, 6]}',
    b'{"x": [1, 2, 3], "y": [2, 4, 6]} ',
    b'{"x": [1, 2, 3], "y": [2, 4, 6]} x',
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content", TRICKY, ids=range(len(TRICKY)))
def test_a_fit_body_gets_the_answer_fastapi_gave(
    pair: tuple[TestClient, TestClient], content: bytes
) -> None:
    same_answer(pair, content)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/merge-patch+json"}],
)
def test_the_content_type_decides_as_it_did(
    pair: tuple[TestClient, TestClient], headers: dict[str, str]
) -> None:
    same_answer(pair, b'{"x": [1, 2, 3], "y": [2, 4, 6]}', headers)


@pytest.mark.timeout(300)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bad_bodies)
def test_any_body_gets_the_answer_fastapi_gave(
    pair: tuple[TestClient, TestClient], body: Any
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    same_answer(pair, content)


@pytest.mark.timeout(120)
def test_an_idempotent_fit_is_recognised_by_its_checked_body(
    pair: tuple[TestClient, TestClient],
) -> None:
    """The Idempotency-Key's fingerprint is of the validated body, as before: the same fit
    written differently (spacing, order, 2 for 2.0) is the same fit; another is refused."""
    real, _ = pair
    key = {"Idempotency-Key": f"heavy-{time.time_ns()}", **JSON}
    first = real.post("/fit", content=b'{"x": [1, 2], "y": [2, 4]}', headers=key)
    again = real.post("/fit", content=b'{"y":[2.0,4.0],"x":[1.0,2.0]}', headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = real.post("/fit", content=b'{"x": [1, 2], "y": [2, 5]}', headers=key)
    assert other.status_code == 422
    assert other.json()["type"] == "idempotency-key-reused"


# -- counted before parsed ---------------------------------------------------------------------


def intake_of(client: TestClient) -> Intake:
    intake: Intake = client.app_state["intake"]
    return intake


@pytest.mark.timeout(120)
def test_the_token_is_checked_before_the_body_is_read(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(api_token="s3cret")
    for body in (b"{", b'{"x": [1], "y": [2]}', b"[" + b"0," * 100_000 + b"0]"):
        r = c.post("/fit", content=body, headers=JSON)
        assert r.status_code == 401, r.text
    assert intake_of(c).pid is None  # no body reached the intake
    auth = {"Authorization": "Bearer s3cret", **JSON}
    assert c.post("/fit", content=b'{"x": [1], "y": [2]}', headers=auth).status_code == 202


@pytest.mark.timeout(120)
def test_a_fit_with_too_many_values_is_refused_before_it_is_parsed(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(max_samples=100)
    zeros = b"[" + b"0," * 10_000 + b"0]"
    r = c.post("/fit", content=b'{"x": ' + zeros + b', "y": ' + zeros + b"}", headers=JSON)
    assert r.status_code == 422
    problem = r.json()
    assert "SGD_MAX_SAMPLES=100" in problem["detail"]
    assert problem["errors"] == [{"field": "x", "message": "too many values", "code": "limit"}]
    assert intake_of(c).pid is None  # refused as it arrived: never parsed
    # at the limit, the intake checks it as the route always did
    ok = {"x": [1.0] * 100, "y": [2.0] * 100, "epochs": 5}
    assert c.post("/fit", json=ok).status_code == 202
    over = {"x": [1.0] * 101, "y": [2.0] * 101}
    r = c.post("/fit", json=over)
    assert r.status_code == 422
    assert r.json()["errors"][0]["message"] == "101 samples is more than SGD_MAX_SAMPLES=100"


@pytest.mark.timeout(120)
def test_a_prediction_batch_is_counted_and_limited_to_what_it_takes(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(max_predict_batch=10)
    wait_job(c, c.post("/fit", json={"x": [1, 2, 3], "y": [2, 4, 6], "epochs": 5}).json()["id"])
    assert c.post("/predict", json={"hours": [1.0] * 10}).status_code == 200
    for n in (11, 10_000):  # just over (parsed, then counted) and far over (counted first)
        r = c.post("/predict", json={"hours": [1.0] * n})
        assert r.status_code == 422
        assert r.json()["detail"] == "at most 10 hours per request; split the request"
    # room for 10 numbers of 32 bytes and 1 MiB more, not SGD_MAX_BODY_BYTES (64 MiB)
    big = b'{"hours": [' + b" " * (2 * MiB) + b"1]}"
    r = c.post("/predict", content=big, headers=JSON)
    assert r.status_code == 413
    assert "SGD_MAX_PREDICT_BATCH=10" in r.json()["detail"]
    assert c.post("/fit", content=big, headers=JSON).status_code == 422  # a fit may be bigger


# -- /history, written a slice at a time -------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_long_history_is_the_history_the_store_holds(client: TestClient) -> None:
    """Over many slices, with b and val_loss, paged and thinned: the streamed JSON is the
    store's History, value for value, as FastAPI wrote it."""
    fit = {
        "x": [1, 2, 3, 4, 5, 6],
        "y": [2, 4, 6, 8, 10, 12],
        "epochs": 70_000,
        "fit_intercept": True,
        "validation_fraction": 0.34,
        "seed": 5,
    }
    job = wait_job(client, client.post("/fit", json=fit).json()["id"])
    store: Store = client.app_state["store"]
    for since, limit, points in [
        (0, None, 1_000_000),  # all of it, 70,000 epochs in slices
        (0, None, 1_000),  # thinned
        (123, 50_001, 40_000),  # a page, thinned, its last epoch kept
        (69_999, None, 10),
        (70_000, None, 10),  # past the end: no epochs
    ]:
        query: dict[str, Any] = {"job_id": job["id"], "since": since, "max_points": points}
        if limit is not None:
            query["limit"] = limit
        r = client.get("/history", params=query)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        expected = store.history(job["id"], since, limit, points).model_dump(mode="json")
        assert r.json() == expected
        assert list(r.json()) == list(expected)  # the keys in FastAPI's order


@pytest.mark.timeout(120)
def test_a_history_without_b_writes_null(client: TestClient) -> None:
    job = wait_job(
        client, client.post("/fit", json={"x": [1], "y": [2], "epochs": 30}).json()["id"]
    )
    body = client.get("/history", params={"job_id": job["id"]}).json()
    assert body["b"] is None
    assert body["val_loss"] is None
    assert body["epoch"] == list(range(30))
    assert len(body["w"]) == 30
    assert all(math.isfinite(v) and v >= 0 for v in body["loss"])


# -- helper processes that die -----------------------------------------------------------------


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 10.0, "the kill")


@pytest.mark.timeout(180)
def test_a_killed_intake_loses_no_fit(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_queued_jobs=50)
    fit = {"x": [1, 2, 3], "y": [2, 4, 6], "epochs": 10}
    assert c.post("/fit", json=fit).status_code == 202
    first = intake_of(c).pid
    assert first is not None
    kill(first)  # idle: the next fit starts a new one
    r = c.post("/fit", json=fit)
    assert r.status_code == 202, r.text
    assert wait_job(c, r.json()["id"])["status"] == "succeeded"
    assert intake_of(c).pid not in (None, first)
    # killed while it reads a body (or just before, or just after): the fit is still taken
    big = json.dumps({"x": [1.5] * 200_000, "y": [3.0] * 200_000, "epochs": 10}).encode()
    for delay in (0.0, 0.02, 0.05, 0.1):
        # a live intake first: the kill below must be the only one this big fit meets
        assert c.post("/fit", json=fit).status_code == 202
        answers: list[httpx.Response] = []

        def send(into: list[httpx.Response] = answers) -> None:
            into.append(c.post("/fit", content=big, headers=JSON))

        post = threading.Thread(target=send)
        post.start()
        time.sleep(delay)
        pid = intake_of(c).pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        post.join(60)
        assert len(answers) == 1
        assert answers[0].status_code == 202, answers[0].text
        assert wait_job(c, answers[0].json()["id"])["status"] == "succeeded"


@pytest.mark.timeout(180)
def test_a_killed_plotter_loses_no_plot(client: TestClient) -> None:
    wait_job(client, client.post("/fit", json={"x": [1], "y": [2], "epochs": 20}).json()["id"])
    assert client.get("/history/plot").status_code == 200
    plotter: Plotter = client.app_state["plotter"]
    first = plotter.pid()
    kill(first)
    r = client.get("/history/plot")
    assert r.status_code == 200
    assert r.content.startswith(b"\x89PNG")
    assert plotter.pid() != first


# -- memory: a 64 MiB body ---------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def zeros(key: bytes, size: int) -> Iterator[bytes]:
    """A JSON body of `size` bytes, {"key": [0,0,...]}, streamed in 1 MiB chunks."""
    head, tail = b'{"' + key + b'": [', b"0]}"
    yield head
    left = size - len(head) - len(tail)
    while left > 0:
        n = min(MiB, left) // 2 * 2 or 2
        yield b"0," * (n // 2)
        left -= n
    yield tail


@pytest.mark.timeout(180)
def test_a_64_mib_body_costs_the_server_no_more_than_its_size(
    make_server: Callable[..., Server],
) -> None:
    """A 63 MiB body of zeros made the server allocate 1.9 GB of Python floats. Now /predict
    refuses it by its length (413), or, streamed without one, by its count as it arrives
    (422), and /fit by its count (its body limit is 64 MiB), or for want of a token before
    reading it. The server's peak memory may grow by at most the body's size."""
    size = 63 * MiB
    for env in ({}, {"SGD_API_TOKEN": "s3cret"}):
        srv = make_server(**env)
        with srv.client() as c:
            c.get("/healthz")
            before = peak_rss(srv.proc.pid)
            for path, key, sized, streamed in (
                ("/predict", b"hours", 413, 422),
                ("/fit", b"x", 422, 422),
            ):
                if env and path == "/fit":
                    sized = streamed = 401
                r = c.post(path, content=b"".join(zeros(key, size)), headers=JSON)
                assert r.status_code == sized, r.text
                r = c.post(path, content=zeros(key, size), headers=JSON)  # no Content-Length
                assert r.status_code == streamed, r.text
            grown = peak_rss(srv.proc.pid) - before
        assert grown < size, f"the peak grew by {grown / MiB:.0f} MiB"
        srv.stop()


HELPERS = ("sgd-intake", "sgd-plotter", "sgd-forkserver", "sgd-worker")


def helpers_of(pid: int) -> dict[str, int]:
    """The server's helper processes by name: the intake, the plotter, the training worker
    and the fork server it comes from."""
    return {name: p for name in HELPERS for p in named_descendants(pid, name)}


@pytest.mark.timeout(120)
def test_a_server_killed_with_9_leaves_no_helper_behind(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server()
    with srv.client() as c:
        job = c.post("/fit", json={"x": [1, 2, 3], "y": [2, 4, 6], "epochs": 20}).json()
        wait_job(c, job["id"])
        assert c.get("/history/plot").status_code == 200
    wait_until(lambda: len(helpers_of(srv.proc.pid)) == len(HELPERS), 30.0, "every helper named")
    helpers = helpers_of(srv.proc.pid)
    srv.proc.kill()
    srv.proc.wait(10)
    for name, pid in helpers.items():
        wait_until(lambda pid=pid: not alive(pid), 15.0, f"{name} gone with its server")  # type: ignore[misc]


def _turns_given(competitor_seconds: float) -> int:
    """How many times a task that is always ready runs while one give_way() waits."""

    async def main() -> int:
        ran = 0

        async def competitor() -> None:
            nonlocal ran
            while True:
                end = time.perf_counter() + competitor_seconds
                while time.perf_counter() < end:
                    pass
                ran += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(competitor())
        await asyncio.sleep(0)  # the competitor starts
        ran = 0
        await turns.give_way()
        other.cancel()
        return ran

    return asyncio.run(main())


def test_a_heavy_step_gives_a_busy_loop_every_turn_and_a_quiet_one_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every turn ran something (the threshold below any turn): all TURNS turns are given
    monkeypatch.setattr(turns, "IDLE_TURN_SECONDS", 0.0)
    assert _turns_given(0.0) == turns.TURNS
    # the first turn came back "at once" (the threshold above any turn): the loop is quiet
    monkeypatch.setattr(turns, "IDLE_TURN_SECONDS", 10.0)
    assert _turns_given(0.0) == 1
    # the real threshold: a competitor that works 1 ms a turn is waited for every time
    monkeypatch.undo()
    assert _turns_given(0.001) == turns.TURNS
