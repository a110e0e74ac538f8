"""The typed client against the real app (TestClient, and a real server for streams and async)."""

import ast
import asyncio
import contextlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.client import (
    RECONNECTS,
    AsyncSGDClient,
    ConflictError,
    FitOptions,
    InvalidRequestError,
    ModelNotReadyError,
    NotFoundError,
    ProblemError,
    QueueFullError,
    SGDClient,
    TransportFailed,
    UnauthorizedError,
    UnavailableError,
    UnexpectedResponse,
    WaitTimeout,
)
from service.core.schemas import Job, JobStatus, ProgressEvent
from tests.conftest import TIMEOUT, TUTORIAL, Server, free_port

X, Y = TUTORIAL["x"], TUTORIAL["y"]
# A fit that runs for minutes whatever the engine: 65,536 samples drawn every epoch.
LONG: FitOptions = {"epochs": 1_000_000, "batch_size": 65_536, "seed": 1}


@pytest.fixture
def sgd(client: TestClient) -> SGDClient:
    return SGDClient(client)


@pytest.fixture
def live_server(default_server: Server) -> Server:
    """The run's shared default server: these tests never need an empty one."""
    return default_server


# -- the round trip ---------------------------------------------------------------------------


def test_fit_wait_predict_the_tutorial(sgd: SGDClient) -> None:
    job = sgd.fit(X, Y, seed=7)
    assert isinstance(job, Job)
    assert job.params.epochs == 100  # left out: the service's defaults
    assert job.params.batch_size == 1
    assert job.params.seed == 7
    ended = sgd.wait(job.id, timeout=60)
    assert ended.status is JobStatus.succeeded
    assert ended.result is not None
    assert sgd.predict(4) == pytest.approx(8.0, abs=0.01)
    model = sgd.model()
    assert model.job_id == job.id or model.version > ended.result.model_version
    scores = sgd.predict_many([1, 2, 4])
    assert scores == pytest.approx([2.0, 4.0, 8.0], abs=0.01)


def test_fit_sends_only_the_options_given(sgd: SGDClient) -> None:
    job = sgd.fit(
        X,
        Y,
        epochs=50,
        learning_rate=0.02,
        init_w=0.5,
        batch_size=None,
        fit_intercept=True,
        seed=3,
    )
    assert job.params.model_dump() == {
        "epochs": 50,
        "learning_rate": 0.02,
        "init_w": 0.5,
        "batch_size": None,  # None: full-batch gradient descent
        "fit_intercept": True,
        "seed": 3,
        # the lifecycle options left out: no split, no early stop, published, a cold start
        "validation_fraction": 0.0,
        "tol": None,
        "n_iter_no_change": 5,
        "publish": "always",
        "init_from": None,
        "init_b": 0.0,
        "canary": None,
    }
    assert sgd.wait(job.id).status is JobStatus.succeeded


def test_idempotency_key_returns_the_same_job(sgd: SGDClient) -> None:
    first = sgd.fit(X, Y, seed=1, idempotency_key="client-test-key")
    again = sgd.fit(X, Y, seed=1, idempotency_key="client-test-key")
    assert again.id == first.id
    with pytest.raises(InvalidRequestError) as err:
        sgd.fit(X, Y, seed=2, idempotency_key="client-test-key")
    assert err.value.type == "idempotency-key-reused"


def test_history_and_plot(sgd: SGDClient) -> None:
    job = sgd.fit(X, Y, epochs=300, seed=11)
    sgd.wait(job.id)
    history = sgd.history(job.id)
    assert history.job_id == job.id
    assert history.epoch == list(range(300))
    page = sgd.history(job.id, since=100, limit=50)
    assert page.epoch == list(range(100, 150))
    assert page.next_since == 150
    thinned = sgd.history(job.id, max_points=10)
    assert thinned.count <= 10
    assert thinned.epoch[-1] == 299
    assert sgd.plot(job.id).startswith(b"\x89PNG")
    assert b"<svg" in sgd.plot(job.id, "svg")


def test_job_and_cancel(sgd: SGDClient) -> None:
    job = sgd.fit(X, Y, epochs=10, seed=1)
    assert sgd.job(job.id).id == job.id
    sgd.wait(job.id)
    with pytest.raises(ConflictError) as err:
        sgd.cancel(job.id)
    assert err.value.status == 409
    assert err.value.type == "job-ended"


def test_cancel_a_long_job_and_wait_times_out(sgd: SGDClient) -> None:
    job = sgd.fit(X, Y, **LONG)
    with pytest.raises(WaitTimeout) as err:
        sgd.wait(job.id, timeout=0.05)
    assert err.value.job.id == job.id
    assert not err.value.job.status.ended
    cancelled = sgd.cancel(job.id)
    assert cancelled.status is JobStatus.cancelled


# -- errors carry the problem -----------------------------------------------------------------


def test_invalid_data_raises_with_every_field(sgd: SGDClient) -> None:
    with pytest.raises(InvalidRequestError) as err:
        sgd.fit([1.0, 2.0], [2.0], epochs=0)
    exc = err.value
    assert isinstance(exc, ProblemError)
    assert exc.status == 422
    assert exc.type == "validation-error"
    assert exc.problem.errors is not None
    assert {e.field for e in exc.problem.errors} == {"epochs"}  # edge validation comes first
    with pytest.raises(InvalidRequestError) as err:
        sgd.fit([1.0, 2.0], [2.0])
    assert err.value.problem.errors is not None
    assert [e.field for e in err.value.problem.errors] == ["y"]
    assert "send one score per hour value" in err.value.problem.errors[0].message


def test_unknown_job_raises_not_found(sgd: SGDClient) -> None:
    for call in (lambda: sgd.job("nope"), lambda: sgd.history("nope"), lambda: sgd.plot("nope")):
        with pytest.raises(NotFoundError) as err:
            call()
        assert err.value.type == "job-not-found"
        assert "GET /jobs lists the recent ones" in err.value.detail


def test_no_model_yet_raises_model_not_ready(make_client: Callable[..., TestClient]) -> None:
    sgd = SGDClient(make_client())
    for call in (lambda: sgd.predict(4), lambda: sgd.predict_many([4]), sgd.model):
        with pytest.raises(ModelNotReadyError) as err:
            call()
        assert isinstance(err.value, UnavailableError)
        assert err.value.status == 503
    with pytest.raises(NotFoundError) as nf:
        sgd.history()
    assert nf.value.type == "history-not-found"


def test_a_token_is_the_callers_header(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_token="s3cret")
    with pytest.raises(UnauthorizedError) as err:
        SGDClient(c).fit(X, Y)
    assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
    c.headers["Authorization"] = "Bearer s3cret"
    assert SGDClient(c).fit(X, Y).status in (JobStatus.queued, JobStatus.running)


def test_a_full_queue_says_when_to_retry(make_client: Callable[..., TestClient]) -> None:
    sgd = SGDClient(make_client(max_queued_jobs=1))
    jobs = []
    refused: QueueFullError | None = None
    for _ in range(10):  # one runs, one waits, the next is refused
        try:
            jobs.append(sgd.fit(X, Y, **LONG))
        except QueueFullError as exc:
            refused = exc
            break
    assert refused is not None
    assert 1 <= len(jobs) <= 2
    assert refused.status == 429
    assert refused.retry_after == 2
    for job in jobs:
        sgd.cancel(job.id)


def test_an_answer_that_is_not_ours_is_unexpected() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    with (
        httpx.Client(transport=httpx.MockTransport(proxy), base_url="http://sgd") as http,
        pytest.raises(UnexpectedResponse) as err,
    ):
        SGDClient(http).predict(4)
    assert err.value.status == 502
    assert "Bad Gateway" in str(err.value)


def test_a_200_that_is_not_ours_is_unexpected() -> None:
    def odd(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"something": "else"})

    with (
        httpx.Client(transport=httpx.MockTransport(odd), base_url="http://sgd") as http,
        pytest.raises(UnexpectedResponse),
    ):
        SGDClient(http).predict(4)


def test_an_unreachable_service_raises_transport_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        sgd = SGDClient(http)
        with pytest.raises(TransportFailed):
            sgd.predict(4)
        with pytest.raises(TransportFailed):
            list(sgd.events("job"))


# -- events -----------------------------------------------------------------------------------


def test_events_of_a_real_fit(live_server: Server) -> None:
    with live_server.client() as http:
        sgd = SGDClient(http)
        job = sgd.fit(X, Y, epochs=20_000, seed=5)
        events = list(sgd.events(job.id))
    progress, end = events[:-1], events[-1]
    assert all(isinstance(e, ProgressEvent) for e in progress)
    epochs = [x for e in progress if isinstance(e, ProgressEvent) for x in e.epoch]
    assert epochs == [*range(0, 20_000, 20), 19_999]
    assert isinstance(end, Job)
    assert end.status is JobStatus.succeeded
    assert end.result is not None
    assert end.result.w == pytest.approx(2.0)


def test_events_resume_from_a_given_id(live_server: Server) -> None:
    with live_server.client() as http:
        sgd = SGDClient(http)
        job = sgd.fit(X, Y, epochs=100, seed=5)
        sgd.wait(job.id)
        events = list(sgd.events(job.id, last_event_id="90"))
        assert list(sgd.events(job.id, last_event_id="end")) == []  # 204: nothing left
        with pytest.raises(NotFoundError):
            list(sgd.events("nope"))
        with pytest.raises(InvalidRequestError):
            list(sgd.events(job.id, last_event_id="x"))
    first = events[0]
    assert isinstance(first, ProgressEvent)
    assert first.epoch == list(range(90, 100))
    assert isinstance(events[-1], Job)


def sse(event_id: str, event: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


def progress_data(epochs: list[int]) -> dict[str, Any]:
    floats = [float(e) for e in epochs]
    return {
        "epoch": epochs,
        "w": floats,
        "loss": floats,
        "progress": {"epoch": epochs[-1] + 1, "epochs": 4},
    }


def test_a_dropped_stream_is_resumed_at_the_last_id() -> None:
    """The client reconnects with Last-Event-ID after the connection breaks mid-stream."""
    job = Job.model_validate({**CANCELLED_JOB, "status": "succeeded"})
    first = "retry: 1000\n\n: keep-alive\n\n" + sse("2", "progress", progress_data([0, 1]))
    rest = sse("4", "progress", progress_data([2, 3])) + sse(
        "end", "end", job.model_dump(mode="json")
    )
    seen: list[str | None] = []

    class Breaks(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield first.encode()
            raise httpx.ReadError("connection reset")

    def service(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:
            return httpx.Response(200, stream=Breaks())
        return httpx.Response(200, text=rest)

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http:
        events = list(SGDClient(http).events("j"))
    assert seen == [None, "2"]
    epochs = [x for e in events if isinstance(e, ProgressEvent) for x in e.epoch]
    assert epochs == [0, 1, 2, 3]
    assert events[-1] == job


def test_a_stream_that_keeps_closing_gives_up() -> None:
    calls = 0

    def service(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, text=": nothing\n\n")  # closes without an end event

    with (
        httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http,
        pytest.raises(TransportFailed, match="closed before the end event"),
    ):
        list(SGDClient(http).events("j"))
    assert calls == 1 + RECONNECTS


def test_an_evicted_job_streams_a_problem() -> None:
    problem = {"type": "job-not-found", "title": "No such job", "status": 404, "detail": "gone"}

    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse("end", "problem", problem))

    with (
        httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http,
        pytest.raises(NotFoundError) as err,
    ):
        list(SGDClient(http).events("j"))
    assert err.value.detail == "gone"


# -- the async twin ---------------------------------------------------------------------------


def test_the_async_client_does_the_same(live_server: Server) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=TIMEOUT) as http:
            sgd = AsyncSGDClient(http)
            job = await sgd.fit(X, Y, seed=9)
            events = [e async for e in sgd.events(job.id)]
            assert isinstance(events[-1], Job)
            assert events[-1].status is JobStatus.succeeded
            ended = await sgd.wait(job.id, timeout=60)
            assert ended.status is JobStatus.succeeded
            assert await sgd.predict(4) == pytest.approx(8.0, abs=0.01)
            assert await sgd.predict_many([2]) == pytest.approx([4.0], abs=0.01)
            assert (await sgd.model()).version >= 1
            assert (await sgd.job(job.id)).id == job.id
            assert (await sgd.history(job.id, max_points=10)).count <= 10
            assert (await sgd.plot(job.id)).startswith(b"\x89PNG")
            with pytest.raises(ConflictError):
                await sgd.cancel(job.id)
            with pytest.raises(InvalidRequestError):
                await sgd.fit([1.0], [1.0, 2.0])
            long = await sgd.fit(X, Y, **LONG)
            with pytest.raises(WaitTimeout):
                await sgd.wait(long.id, timeout=0.05)
            assert (await sgd.cancel(long.id)).status is JobStatus.cancelled

    asyncio.run(scenario())


def test_a_malformed_event_is_unexpected() -> None:
    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse("3", "progress", {"epoch": "three"}))

    with (
        httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http,
        pytest.raises(UnexpectedResponse, match="event progress"),
    ):
        list(SGDClient(http).events("j"))


def test_unknown_event_types_are_skipped() -> None:
    params = {"epochs": 4, "learning_rate": 0.01, "init_w": 1.0, "batch_size": 1, "seed": 1}
    job: dict[str, Any] = {"id": "j", "status": "cancelled", "created_at": "2026-01-01T00:00:00Z"}
    job |= {"n_samples": 3, "progress": {"epoch": 0, "epochs": 4}}
    job["params"] = {**params, "fit_intercept": False}

    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse("1", "news", {"x": 1}) + sse("end", "end", job))

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http:
        events = list(SGDClient(http).events("j"))
    assert [type(e) for e in events] == [Job]


# -- through a real TCP proxy that cuts connections ---------------------------------------------


class Cut(Exception):
    """The proxy has sent the part of the answer it lets through."""


class CuttingProxy:
    """A TCP proxy in front of a real server that cuts answers at random byte offsets.

    Each connection carries one request. With `cuts` on, the answer is cut at a random byte
    offset inside one of its first pieces: the status line and headers, or one of the next few
    chunks of the body (an event of the stream is one chunk), so that most cuts fall inside an
    event, after its `id:` line or before it. A cut is one of three: a reset (RST), a close in
    the middle of the chunked body (an incomplete message), or a clean close of a body that the
    proxy re-frames as delimited by the close, which the client cannot tell from a normal end.
    The first `refuse` connections are reset at once; after `hang_after` connections every
    later one is held unanswered.
    """

    STYLES = ("reset", "close-chunked", "close-clean")

    def __init__(self, upstream: str, seed: int, cuts: bool = False, refuse: int = 0) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rng = random.Random(seed)
        self.cutting, self.refuse = cuts, refuse
        self.hang_after: int | None = None
        self.connections = 0
        self.cuts: Counter[str] = Counter()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self.open:
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.connections += 1
                number = self.connections
                style = self.rng.choice(self.STYLES)
                # the piece to cut (0: the head; a few head cuts, mostly events) and where in it
                piece = self.rng.choice([0, 1, 2, 2, 3, 3, 4, 4]) if self.cutting else None
                cut = _Cut(piece, self.rng.random())
                self.open.append(client)
            threading.Thread(target=self._relay, args=(client, number, style, cut)).start()

    def _relay(self, client: socket.socket, number: int, style: str, cut: "_Cut") -> None:
        with contextlib.suppress(OSError):  # the client went away first, or the proxy closed
            self._serve(client, number, style, cut)

    def _serve(self, client: socket.socket, number: int, style: str, cut: "_Cut") -> None:
        client.settimeout(TIMEOUT * 3)
        with client:
            if number <= self.refuse:
                self._cut(client, "reset")
                return
            if self.hang_after is not None and number > self.hang_after:
                client.recv(65536)  # the request, which is never answered
                client.recv(65536)  # until the client gives up and closes
                return
            with (
                socket.create_connection(self.upstream, timeout=TIMEOUT * 3) as up,
                up.makefile("rb") as answer,
            ):
                up.sendall(_read_request(client))
                try:
                    self._forward(answer, client, cut, clean=style == "close-clean")
                except Cut:
                    with self.lock:
                        self.cuts[style] += 1
                    self._cut(client, style)

    @staticmethod
    def _forward(answer: Any, client: socket.socket, cut: "_Cut", clean: bool) -> None:
        status = answer.readline()
        headers = []
        while (line := answer.readline()) not in (b"\r\n", b""):
            headers.append(line)
        names = {h.split(b":")[0].strip().lower(): h.split(b":", 1)[1].strip() for h in headers}
        chunked = names.get(b"transfer-encoding") == b"chunked"
        hop = (b"transfer-encoding", b"connection", b"content-length")
        kept = [h for h in headers if h.split(b":")[0].strip().lower() not in hop]
        if chunked and not clean:
            kept.append(b"Transfer-Encoding: chunked\r\n")
        elif not chunked and b"content-length" in names:
            kept.append(b"Content-Length: " + names[b"content-length"] + b"\r\n")
        cut.send(client, status + b"".join(kept) + b"Connection: close\r\n\r\n")
        if not chunked:
            cut.send(client, answer.read(int(names.get(b"content-length", b"0"))))
            return
        while size := int(answer.readline().split(b";")[0], 16):
            piece = answer.read(size)
            answer.readline()
            cut.send(client, piece if clean else b"%x\r\n%s\r\n" % (size, piece))
        if not clean:
            cut.send(client, b"0\r\n\r\n")

    @staticmethod
    def _cut(client: socket.socket, style: str) -> None:
        if style == "reset":  # linger 0: close sends RST
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            client.shutdown(socket.SHUT_WR)


class _Cut:
    """Sends pieces whole until piece number `piece`, then `fraction` of it, and raises Cut."""

    def __init__(self, piece: int | None, fraction: float) -> None:
        self.piece, self.fraction, self.sent = piece, fraction, 0

    def send(self, sock: socket.socket, data: bytes) -> None:
        if self.sent == self.piece:
            sock.sendall(data[: int(len(data) * self.fraction)])
            raise Cut
        self.sent += 1
        sock.sendall(data)


def _read_request(client: socket.socket) -> bytes:
    """A GET's head (the client sends no body through this proxy)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            raise OSError("the client closed before its request")
        data += chunk
    return data


# A fit of a few seconds: its 1,001 grid epochs come in about 20 events a second.
def cut_fit(seed: int) -> FitOptions:
    return {"epochs": 20_000, "batch_size": 10_000, "seed": seed}


CUT_GRID = [*range(0, 20_000, 20), 19_999]


def grid_epochs(events: list[Any]) -> list[int]:
    assert isinstance(events[-1], Job)
    assert events[-1].status is JobStatus.succeeded
    assert all(isinstance(e, ProgressEvent) for e in events[:-1])
    return [x for e in events[:-1] for x in e.epoch]


@pytest.mark.timeout(300)
def test_events_through_a_proxy_that_cuts_at_random_offsets(live_server: Server) -> None:
    """Every grid epoch arrives exactly once, however often and wherever the stream is cut:
    four clients (three blocking, one async) follow one fit at once, each through a proxy that
    cuts at offsets of its own."""
    proxies = [CuttingProxy(live_server.url, seed, cuts=True) for seed in (0, 1, 2, 99)]

    def through(proxy: CuttingProxy) -> list[Any]:
        with httpx.Client(base_url=proxy.url, timeout=TIMEOUT) as http:
            return list(SGDClient(http).events(job.id, reconnects=100))

    async def through_async(proxy: CuttingProxy) -> list[Any]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=TIMEOUT) as http:
            return [e async for e in AsyncSGDClient(http).events(job.id, reconnects=100)]

    try:
        with live_server.client() as direct:
            job = SGDClient(direct).fit(X, Y, **cut_fit(0))
        with ThreadPoolExecutor(len(proxies)) as pool:
            streams = [pool.submit(through, proxy) for proxy in proxies[:-1]]
            streams.append(pool.submit(asyncio.run, through_async(proxies[-1])))
            for stream in streams:
                assert grid_epochs(stream.result(timeout=240)) == CUT_GRID
    finally:
        for proxy in proxies:
            proxy.close()
    cuts = sum((proxy.cuts for proxy in proxies), Counter[str]())
    print(f"cuts: {dict(cuts)}")
    assert set(cuts) == set(CuttingProxy.STYLES), cuts  # each way of cutting happened
    assert sum(cuts.values()) >= 40, cuts  # about 100 on the machine in README


def test_a_stream_that_ends_cleanly_mid_event_is_resumed() -> None:
    """Half an event, then a clean end: the next connection resumes after the last whole event
    and starts with a fresh decoder (the half is dropped, never glued onto the new lines)."""
    whole = sse("2", "progress", progress_data([0, 1]))
    half = sse("4", "progress", progress_data([2, 3]))[:25]  # "id: 4" and part of the event line
    rest = sse("4", "progress", progress_data([2, 3])) + sse("end", "end", CANCELLED_JOB)
    seen: list[str | None] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        return httpx.Response(200, text=whole + half if len(seen) == 1 else rest)

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http:
        events = list(SGDClient(http).events("j"))
    assert seen == [None, "2"]  # not "4": that event never arrived whole
    assert [x for e in events if isinstance(e, ProgressEvent) for x in e.epoch] == [0, 1, 2, 3]
    assert isinstance(events[-1], Job)


CANCELLED_JOB: dict[str, Any] = {
    "id": "j",
    "status": "cancelled",
    "created_at": "2026-01-01T00:00:00Z",
    "params": {
        "epochs": 4,
        "learning_rate": 0.01,
        "init_w": 1.0,
        "batch_size": 1,
        "fit_intercept": False,
        "seed": 1,
    },
    "n_samples": 3,
    "progress": {"epoch": 4, "epochs": 4},
}


# -- wait() ---------------------------------------------------------------------------------


def test_wait_polls_on_through_dropped_connections(live_server: Server) -> None:
    proxy = CuttingProxy(live_server.url, 0, refuse=3)  # the first 3 connections are reset
    try:
        with (
            live_server.client() as direct,
            httpx.Client(base_url=proxy.url, timeout=TIMEOUT) as through,
        ):
            job = SGDClient(direct).fit(X, Y, seed=1)
            ended = SGDClient(through).wait(job.id, timeout=60)
    finally:
        proxy.close()
    assert ended.status is JobStatus.succeeded
    assert proxy.connections > 3


def test_no_poll_of_wait_outlives_its_deadline(live_server: Server) -> None:
    """A service that stops answering: wait(timeout=1) ends after about 1 s, not after the
    client's 10 s request timeout."""
    proxy = CuttingProxy(live_server.url, 0)
    proxy.hang_after = 1  # the first poll is answered, every later one hangs
    try:
        with (
            live_server.client() as direct,
            httpx.Client(base_url=proxy.url, timeout=TIMEOUT) as through,
        ):
            job = SGDClient(direct).fit(X, Y, **LONG)
            started = time.monotonic()
            with pytest.raises(WaitTimeout) as err:
                SGDClient(through).wait(job.id, timeout=1.0)
            took = time.monotonic() - started
            SGDClient(direct).cancel(job.id)
    finally:
        proxy.close()
    assert err.value.job.id == job.id
    assert took < TIMEOUT / 2


@pytest.mark.parametrize("timeout", [math.nan, -1.0, -math.inf])
def test_wait_refuses_a_timeout_that_is_no_duration(sgd: SGDClient, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        sgd.wait("any", timeout=timeout)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url="http://sgd") as http:
            await AsyncSGDClient(http).wait("any", timeout=timeout)

    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        asyncio.run(scenario())


# -- job ids are one path segment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("job_id", "segment"),
    [
        ("../model", "..%2Fmodel"),
        ("a?b=1", "a%3Fb%3D1"),
        ("..", "%2E%2E"),
        ("a/cancel", "a%2Fcancel"),
    ],
)
def test_a_job_id_is_one_path_segment(client: TestClient, job_id: str, segment: str) -> None:
    """An id never reaches another route, a query or a dot segment that the URL resolves away."""
    sent: list[httpx.Request] = []
    client.event_hooks["request"].append(sent.append)
    try:
        sgd = SGDClient(client)
        for call in (sgd.job, sgd.cancel, lambda j: list(sgd.events(j))):
            with pytest.raises(ProblemError):  # 404 (or 405: the server decodes %2F)
                call(job_id)
    finally:
        client.event_hooks["request"].remove(sent.append)
    assert [(r.url.raw_path, r.url.query) for r in sent] == [
        (f"/jobs/{segment}".encode(), b""),
        (f"/jobs/{segment}/cancel".encode(), b""),
        (f"/jobs/{segment}/events".encode(), b""),
    ]
    with pytest.raises(NotFoundError):
        SGDClient(client).job("../model")  # never GET /model


def test_versions_and_a_rollback(make_client: Callable[..., TestClient]) -> None:
    sgd = SGDClient(make_client())
    first = sgd.wait(sgd.fit(X, Y, seed=1, epochs=5).id).result
    second = sgd.wait(sgd.fit(X, Y, seed=2).id).result
    assert first is not None
    assert second is not None
    listed = sgd.models()
    assert listed.served_version == second.model_version
    assert [v.version for v in listed.versions] == [second.model_version, first.model_version]
    assert sgd.version(first.model_version).w == first.w
    assert sgd.predict(4, version=first.model_version) == pytest.approx(first.w * 4)
    assert sgd.predict_many([1, 2], version=first.model_version) == pytest.approx(
        [first.w, first.w * 2]
    )
    served = sgd.serve(first.model_version)
    assert served.served
    assert sgd.model().version == first.model_version
    with pytest.raises(NotFoundError) as missing:
        sgd.version(99)
    assert missing.value.problem.type == "version-not-found"


def test_the_async_client_lists_and_serves_versions(live_server: Server) -> None:
    async def scenario() -> tuple[int | None, int, float]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=TIMEOUT) as http:
            sgd = AsyncSGDClient(http)
            job = await sgd.wait((await sgd.fit(X, Y, seed=3)).id, timeout=60)
            assert job.result is not None
            served = await sgd.serve(job.result.model_version)
            listed = await sgd.models(limit=1)
            score = await sgd.predict(4, version=served.version)
            return listed.served_version, (await sgd.version(served.version)).version, score

    served_version, version, score = asyncio.run(scenario())
    assert served_version == version
    assert score == pytest.approx(8.0, abs=0.01)


# -- what fit sends: a recording service ----------------------------------------------------


class RecordingService:
    """A tiny real HTTP server that records each request and answers POST /fit with a queued
    job: what the client sends, exactly (the service's job shows the options as resolved, with
    its defaults filled in)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorded.append(("POST", self.path, json.loads(body)))
                answer = json.dumps({**CANCELLED_JOB, "status": "queued"}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reads `requests`

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[Any]:
        return [body for _, _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def recording() -> Iterator[RecordingService]:
    service = RecordingService()
    yield service
    service.close()


NEW_OPTIONS: FitOptions = {
    "validation_fraction": 0.2,
    "tol": 1e-4,
    "n_iter_no_change": 3,
    "publish": "if_better",
    "init_from": "served",
}
# the other spellings: null turns early stopping off; a kept version to warm start from
OTHER_OPTIONS: FitOptions = {"tol": None, "publish": "never", "init_from": 2}


def test_fit_sends_the_new_options_exactly_as_given(recording: RecordingService) -> None:
    with httpx.Client(base_url=recording.url, timeout=TIMEOUT) as http:
        sgd = SGDClient(http)
        assert sgd.fit(X, Y, **NEW_OPTIONS).status is JobStatus.queued
        sgd.fit(X, Y, **OTHER_OPTIONS)
        sgd.fit(X, Y, seed=1)
    assert [path for _, path, _ in recording.requests] == ["/fit"] * 3
    assert recording.bodies() == [
        {"x": X, "y": Y, **NEW_OPTIONS},
        {"x": X, "y": Y, "tol": None, "publish": "never", "init_from": 2},
        {"x": X, "y": Y, "seed": 1},  # nothing the caller left out
    ]


def test_the_async_client_sends_the_new_options_too(recording: RecordingService) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=recording.url, timeout=TIMEOUT) as http:
            sgd = AsyncSGDClient(http)
            await sgd.fit(X, Y, **NEW_OPTIONS)
            await sgd.fit(X, Y, **OTHER_OPTIONS)
            await sgd.fit(X, Y)

    asyncio.run(scenario())
    assert recording.bodies() == [
        {"x": X, "y": Y, **NEW_OPTIONS},
        {"x": X, "y": Y, **OTHER_OPTIONS},
        {"x": X, "y": Y},
    ]


def test_a_log_plot(sgd: SGDClient) -> None:
    job = sgd.wait(sgd.fit(X, Y, seed=12).id)
    assert sgd.plot(job.id, log=True).startswith(b"\x89PNG")
    assert sgd.plot(job.id, log=True) != sgd.plot(job.id)
    assert b"log scale" in sgd.plot(job.id, "svg", log=True)
    assert b"log scale" not in sgd.plot(job.id, "svg")


def test_the_new_options_against_the_service(make_client: Callable[..., TestClient]) -> None:
    """The service takes what the client sends: a split, early stopping, a warm start from the
    served model, and a version kept without being served."""
    sgd = SGDClient(make_client())
    x = [float(i) for i in range(1, 13)]
    y = [2 * v + 0.5 * (-1) ** i for i, v in enumerate(x)]
    first = sgd.wait(sgd.fit(x, y, seed=1).id)
    assert first.result is not None
    options: FitOptions = {**NEW_OPTIONS, "publish": "never", "epochs": 100_000, "seed": 2}
    job = sgd.fit(x, y, **options)
    assert job.params.init_from == first.result.model_version  # resolved when accepted
    assert (job.params.validation_fraction, job.params.tol) == (0.2, 1e-4)
    assert (job.params.n_iter_no_change, job.params.publish) == (3, "never")
    ended = sgd.wait(job.id, timeout=60)
    result = ended.result
    assert result is not None
    assert result.val_mse is not None
    assert result.stopped_early  # a warm start from a fitted model has little left to learn
    assert result.epochs_run is not None
    assert result.epochs_run < 100_000
    assert result.published is False
    assert sgd.model().version == first.result.model_version  # "never": still the first
    kept = sgd.version(result.model_version)
    assert not kept.served
    assert kept.metrics is not None
    assert kept.metrics.val_mse == result.val_mse
    again = sgd.fit(x, y, seed=3, init_from=result.model_version)  # a kept version, by number
    assert again.params.init_from == result.model_version
    assert sgd.wait(again.id).status is JobStatus.succeeded


def test_the_client_shares_only_the_schemas_with_the_service() -> None:
    """Other services import the client: of this package it may import service.core.schemas alone
    (the request and answer models, ProgressEvent included), never the server's modules."""
    source = Path(__file__).resolve().parents[1] / "service" / "client.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.split(".")[0] == "service"} == {"service.core.schemas"}


# -- prediction intervals -------------------------------------------------------------------

# x = 1..20, y = 2x + noise: a split of half the rows (10 held out) gives both methods. A
# conformal interval of 10 residuals is bounded up to coverage 10/11: 0.9 is, 0.95 is not.
SPLIT_X = [float(i) for i in range(1, 21)]
SPLIT_Y = [2 * x + random.Random(5).gauss(0, 0.3) + 0.2 * math.sin(x) for x in SPLIT_X]
SPLIT: FitOptions = {
    "validation_fraction": 0.5,
    "seed": 4,
    "learning_rate": 0.001,
    "batch_size": None,
    "epochs": 300,
}


def fitted_version(sgd: SGDClient, x: list[float], y: list[float], **options: Any) -> int:
    result = sgd.wait(sgd.fit(x, y, **options).id, timeout=60).result
    assert result is not None
    return result.model_version


def test_intervals_of_both_methods(live_server: Server) -> None:
    with live_server.client() as http:
        sgd = SGDClient(http)
        version = fitted_version(sgd, SPLIT_X, SPLIT_Y, **SPLIT)
        kept = sgd.version(version).intervals
        assert kept is not None
        assert kept.methods == ["conformal", "gaussian"]
        assert kept.conformal is not None
        assert kept.gaussian is not None
        score = sgd.predict(4, version=version)  # unchanged: a bare float
        assert isinstance(score, float)

        conformal = sgd.predict_interval(4, 0.9, version=version)  # the version's first
        assert (conformal.score, conformal.model_version) == (score, version)
        assert conformal.interval is not None
        assert (conformal.interval.method, conformal.interval.coverage) == ("conformal", 0.9)
        q = kept.conformal.half_widths["0.9"]
        assert q is not None
        assert q > 0
        assert conformal.interval.lower == pytest.approx(score - q, rel=1e-12)
        assert conformal.interval.upper == pytest.approx(score + q, rel=1e-12)

        unbounded = sgd.predict_interval(4, 0.95, method="conformal", version=version)
        assert unbounded.interval is not None
        assert (unbounded.interval.lower, unbounded.interval.upper) == (None, None)
        assert unbounded.score == score

        gaussian = sgd.predict_interval(4, 0.9, method="gaussian", version=version)
        assert gaussian.interval is not None
        assert gaussian.interval.method == "gaussian"
        low, high = gaussian.interval.lower, gaussian.interval.upper
        assert low is not None
        assert high is not None
        assert high - score == pytest.approx(score - low, rel=1e-9)  # around the score
        wider = sgd.predict_interval(4, 0.95, method="gaussian", version=version).interval
        assert wider is not None
        assert wider.lower is not None
        assert wider.lower < low  # more coverage, a wider interval

        hours = [1.0, 4.0, 20.0]
        assert sgd.predict_many(hours, version=version) == pytest.approx(
            [score / 4 * h for h in hours]
        )
        many = sgd.predict_many_intervals(hours, 0.9, method="gaussian", version=version)
        assert (many.model_version, many.coverage, many.method) == (version, 0.9, "gaussian")
        assert many.lower is not None
        assert many.upper is not None
        assert many.lower[1] == pytest.approx(low, rel=1e-12)
        assert many.upper[1] == pytest.approx(high, rel=1e-12)
        # the gaussian half width is t s sqrt(1 + h(x)), h the leverage: t s the same for all
        g = kept.gaussian
        halves = [(u - lo) / 2 for lo, u in zip(many.lower, many.upper, strict=True)]
        assert halves[2] > halves[0]  # farther from the centre of the training x: wider
        lev = [(1 / g.n if g.fit_intercept else 0) + (h - g.center) ** 2 / g.spread for h in hours]
        ts = [half / math.sqrt(1 + h) for half, h in zip(halves, lev, strict=True)]
        assert ts == pytest.approx([ts[0]] * 3, rel=1e-9)
        # t(0.95, df) is above the normal's 1.645 and below 2.0 for df >= 8 training rows
        assert 1.6449 * g.s < ts[0] < 2.0 * g.s

        spread = sgd.predict_many_intervals(hours, 0.9, version=version)
        assert spread.method == "conformal"
        assert spread.lower == pytest.approx([s - q for s in many.scores], rel=1e-12)
        assert spread.upper == pytest.approx([s + q for s in many.scores], rel=1e-12)
        none = sgd.predict_many_intervals(hours, 0.95, method="conformal", version=version)
        assert (none.lower, none.upper, none.scores) == (None, None, many.scores)


def test_interval_errors_are_the_clients_problem_errors(live_server: Server) -> None:
    with live_server.client() as http:
        sgd = SGDClient(http)
        plain = fitted_version(sgd, X, Y, seed=1)  # no split: no conformal interval
        split = fitted_version(sgd, SPLIT_X, SPLIT_Y, **SPLIT)
        kept = sgd.version(plain).intervals
        assert kept is not None
        assert "conformal" not in kept.methods
        assert "conformal" in kept.missing
        default = sgd.predict_interval(4, 0.9, version=plain).interval
        assert default is not None
        assert default.method == kept.methods[0] == "gaussian"

        with pytest.raises(ConflictError) as one:
            sgd.predict_interval(4, 0.9, method="conformal", version=plain)
        with pytest.raises(ConflictError) as many:
            sgd.predict_many_intervals([1, 2], 0.9, method="conformal", version=plain)
        for err in (one, many):
            assert (err.value.status, err.value.type) == (409, "interval-unavailable")
            assert err.value.problem.errors is not None
            assert err.value.problem.errors[0].field == "method"

        for coverage in (0.3, 1.0, 0.9991):
            with pytest.raises(InvalidRequestError) as bad:
                sgd.predict_interval(4, coverage, version=split)
            assert "coverage" in {e.field for e in bad.value.problem.errors or []}
            with pytest.raises(InvalidRequestError) as bad_many:
                sgd.predict_many_intervals([4], coverage, version=split)
            assert any("coverage" in e.field for e in bad_many.value.problem.errors or [])
        with pytest.raises(NotFoundError):
            sgd.predict_interval(4, 0.9, version=10_000)


def test_what_an_interval_request_sends() -> None:
    """Coverage always; method and version only when given; an answer without the interval
    asked for (a service that predates intervals ignores ?coverage=) is unexpected."""
    sent: list[tuple[str, dict[str, str], Any]] = []
    old_service = False

    def service(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append((request.method, dict(request.url.params), body))
        if request.method == "GET":
            interval = {"lower": 7.0, "upper": 9.0, "coverage": 0.8, "method": "gaussian"}
            answer: dict[str, Any] = {"hours": 4.0, "score": 8.0, "model_version": 2}
            return httpx.Response(
                200, json=answer | ({} if old_service else {"interval": interval})
            )
        answer = {"scores": [8.0], "model_version": 2}
        extra = {"lower": None, "upper": None, "coverage": 0.8, "method": "conformal"}
        return httpx.Response(200, json=answer | ({} if old_service else extra))

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http:
        sgd = SGDClient(http)
        one = sgd.predict_interval(4, 0.8)
        assert one.interval is not None
        assert (one.interval.lower, one.interval.upper, one.interval.method) == (7, 9, "gaussian")
        sgd.predict_interval(4, 0.8, method="conformal", version=2)
        many = sgd.predict_many_intervals([4], 0.8)
        assert (many.lower, many.upper, many.method) == (None, None, "conformal")
        sgd.predict_many_intervals([4], 0.8, method="gaussian", version=3)
        assert sgd.predict(4) == 8.0  # the plain calls send no coverage
        assert sgd.predict_many([4]) == [8.0]
        old_service = True
        with pytest.raises(UnexpectedResponse):
            sgd.predict_interval(4, 0.8)
        with pytest.raises(UnexpectedResponse):
            sgd.predict_many_intervals([4], 0.8)
        assert sgd.predict(4) == 8.0  # which the plain calls never needed
    assert sent[:6] == [
        ("GET", {"hours": "4", "coverage": "0.8"}, None),
        ("GET", {"hours": "4", "coverage": "0.8", "method": "conformal", "version": "2"}, None),
        ("POST", {}, {"hours": [4], "coverage": 0.8}),
        ("POST", {}, {"hours": [4], "coverage": 0.8, "method": "gaussian", "version": 3}),
        ("GET", {"hours": "4"}, None),
        ("POST", {}, {"hours": [4]}),
    ]


def test_the_async_client_asks_for_intervals(live_server: Server) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=TIMEOUT) as http:
            sgd = AsyncSGDClient(http)
            job = await sgd.wait((await sgd.fit(SPLIT_X, SPLIT_Y, **SPLIT)).id, timeout=60)
            assert job.result is not None
            version = job.result.model_version
            score = await sgd.predict(4, version=version)
            one = await sgd.predict_interval(4, 0.9, method="gaussian", version=version)
            assert one.score == score
            assert one.interval is not None
            assert one.interval.method == "gaussian"
            assert one.interval.lower is not None
            assert one.interval.upper is not None
            assert one.interval.lower < score < one.interval.upper
            many = await sgd.predict_many_intervals([4, 8], 0.9, version=version)
            assert many.method == "conformal"
            assert many.lower is not None
            assert many.upper is not None
            assert many.scores[0] == score
            # conformal: score +- q, the same q at every hours
            widths = [u - lo for lo, u in zip(many.lower, many.upper, strict=True)]
            assert widths[0] > 0
            assert widths[1] == pytest.approx(widths[0], rel=1e-9)
            assert many.upper[0] - score == pytest.approx(score - many.lower[0], rel=1e-9)
            with pytest.raises(InvalidRequestError):
                await sgd.predict_interval(4, 0.2, version=version)
            plain = await sgd.wait((await sgd.fit(X, Y, seed=2)).id, timeout=60)
            assert plain.result is not None
            with pytest.raises(ConflictError) as err:
                await sgd.predict_many_intervals(
                    [4], 0.9, method="conformal", version=plain.result.model_version
                )
            assert err.value.type == "interval-unavailable"

    asyncio.run(scenario())
