"""The people-facing views: the history plot, the live event stream and the web page."""

import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.schemas import FitReport, Job, JobParams, JobStatus
from service.http import views
from service.http.app import create_app
from service.state.base import Store
from tests.conftest import (
    TIMEOUT,
    TUTORIAL,
    Server,
    settings_for_tests,
    wait_job,
    wait_until,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers: jobs written straight into the app's store, so every epoch is known -------------


@pytest.fixture(scope="module")
def app() -> Iterator[TestClient]:
    """An app of this module's own: tests write fake jobs into its store and name them by id."""
    with TestClient(create_app(settings_for_tests(keep_jobs=1000))) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="readiness")
        yield c


def store_of(client: TestClient) -> Store:
    """The store the app's lifespan built (the one its routes read)."""
    store: Store = client.app_state["store"]
    return store


def job_params(epochs: int, fit_intercept: bool = False) -> JobParams:
    return JobParams(
        epochs=epochs,
        learning_rate=0.01,
        init_w=1.0,
        batch_size=1,
        fit_intercept=fit_intercept,
        seed=0,
    )


def fake_job(store: Store, epochs: int, fit_intercept: bool = False) -> Job:
    """A running job the worker never sees: the test writes its history."""
    job, _ = store.create_job(job_params(epochs, fit_intercept), 3)
    started = store.start_job(job.id)
    assert started is not None
    return started


def feed(store: Store, job_id: str, start: int, stop: int, with_b: bool = False) -> None:
    """Epochs start..stop-1 with w = epoch, b = -epoch and loss = 1/(epoch+1): easy to check."""
    epochs = range(start, stop)
    w = array("d", map(float, epochs))
    b = array("d", (-float(e) for e in epochs)) if with_b else None
    store.append_history(job_id, w, b, array("d", (1.0 / (e + 1) for e in epochs)))


def feeder(store: Store, job_id: str, epochs: int, per_tick: int, tick: float) -> Any:
    """A thread that records `per_tick` epochs every `tick` seconds, then ends the job."""

    def run() -> None:
        for start in range(0, epochs, per_tick):
            feed(store, job_id, start, min(epochs, start + per_tick))
            time.sleep(tick)
        store.succeed_job(job_id, FitReport.plain(2.0, 0.0, 0.0, 0.0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def grid(epochs: int, recorded: int | None = None) -> list[int]:
    """The epochs a whole event stream carries: every stride-th, plus the last recorded."""
    recorded = epochs if recorded is None else recorded
    stride = max(1, -(-epochs // views.EVENT_POINTS))
    points = list(range(0, recorded, stride))
    return points if points[-1] == recorded - 1 else [*points, recorded - 1]


@dataclass
class Sse:
    id: str | None
    event: str
    data: Any
    at: float


def read_events(lines: Iterator[str], stop_after: int | None = None) -> list[Sse]:
    """Parse an event stream; stop after `stop_after` progress events, or at its end."""
    events: list[Sse] = []
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
            continue
        if "data" in fields:
            data = json.loads(fields["data"])
            events.append(Sse(fields.get("id"), fields["event"], data, time.monotonic()))
            progress = [e for e in events if e.event == "progress"]
            if stop_after is not None and len(progress) == stop_after:
                break
        fields = {}
    return events


def progress_epochs(events: list[Sse]) -> list[int]:
    return [epoch for e in events if e.event == "progress" for epoch in e.data["epoch"]]


# -- the plot ---------------------------------------------------------------------------------


def png_size(image: bytes) -> tuple[int, int]:
    assert image.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", image[16:24])
    return width, height


def test_plot_is_a_png_of_the_tutorial_fit(client: TestClient) -> None:
    job = client.post("/fit", json={**TUTORIAL, "seed": 1}).json()
    wait_job(client, job["id"])
    r = client.get("/history/plot", params={"job_id": job["id"]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    assert png_size(r.content) == (700, 550)


def test_plot_svg_has_two_panels_titles_and_labels(client: TestClient) -> None:
    job = client.post("/fit", json={**TUTORIAL, "seed": 2}).json()
    wait_job(client, job["id"])
    r = client.get("/history/plot", params={"job_id": job["id"], "format": "svg"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    svg = r.text
    assert svg.lstrip().startswith("<?xml")
    for text in (
        f"job {job['id'][:8]} (succeeded)",
        "Loss per epoch",
        "loss (batch MSE)",
        "Parameters per epoch (before each update)",
        "epoch (100 epochs)",
        ">w<",
    ):
        assert text in svg, text
    assert ">b<" not in svg  # no intercept was fitted
    assert len(re.findall(r'<g id="axes_\d+"', svg)) == 2


def test_plot_draws_b_when_the_intercept_is_fitted(client: TestClient) -> None:
    body = {"x": [1.0, 2.0, 3.0], "y": [3.0, 5.0, 7.0], "fit_intercept": True, "seed": 3}
    job = client.post("/fit", json=body).json()
    wait_job(client, job["id"])
    svg = client.get("/history/plot", params={"job_id": job["id"], "format": "svg"}).text
    assert ">w<" in svg
    assert ">b<" in svg
    assert "y = w·x + b" in svg


def test_plot_of_a_million_epochs_is_thinned(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job = fake_job(store, 1_000_000)
    for start in range(0, 1_000_000, 100_000):
        feed(store, job.id, start, start + 100_000)
    store.succeed_job(job.id, FitReport.plain(2.0, 0.0, 0.0, 0.0))
    # How fast is the bench's business; here: it is thinned, and says so (the test's time limit
    # still fails a plot that hangs).
    r = c.get("/history/plot", params={"job_id": job.id, "format": "svg"})
    assert r.status_code == 200
    assert "epoch (1,000,000 epochs; one point every 501 shown)" in r.text
    png = c.get("/history/plot", params={"job_id": job.id})
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")


def test_plot_of_the_latest_job_shows_what_is_recorded(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client()
    r = c.get("/history/plot")
    assert r.status_code == 404  # no job yet
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "history-not-found"
    store = store_of(c)
    job = fake_job(store, 1000)
    svg = c.get("/history/plot", params={"format": "svg"}).text  # the latest job by default
    assert "no epochs recorded yet" in svg
    assert f"job {job.id[:8]} (running)" in svg
    feed(store, job.id, 0, 10)
    svg = c.get("/history/plot", params={"format": "svg"}).text
    assert "epoch (10 epochs)" in svg


@pytest.mark.parametrize(
    ("params", "status", "problem_type"),
    [
        ({"job_id": "nope"}, 404, "job-not-found"),
        ({"format": "gif"}, 422, "validation-error"),
        ({"max_points": "5"}, 200, None),  # the plot's thinning is its own: extra params ignored
    ],
)
def test_plot_errors_are_problems(
    client: TestClient, params: dict[str, str], status: int, problem_type: str | None
) -> None:
    client.post("/fit", json=TUTORIAL)  # there is a latest job
    wait_until(lambda: client.get("/history").status_code == 200, what="a history")
    r = client.get("/history/plot", params=params)
    assert r.status_code == status
    if problem_type is not None:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == problem_type


def test_log_plot_differs_from_the_linear_one(client: TestClient) -> None:
    job = client.post("/fit", json={**TUTORIAL, "seed": 6}).json()
    wait_job(client, job["id"])

    def plot(**params: str) -> bytes:
        r = client.get("/history/plot", params={"job_id": job["id"], **params})
        assert r.status_code == 200
        image: bytes = r.content
        return image

    linear_png, log_png = plot(), plot(log="true")
    assert png_size(log_png) == png_size(linear_png) == (700, 550)
    assert log_png != linear_png
    assert plot(log="false") == linear_png  # false is the default
    linear, log = plot(format="svg").decode(), plot(format="svg", log="true").decode()
    assert "loss (batch MSE, log scale)" in log
    assert "log scale" not in linear
    # the log axis labels its decades (10^-k, as mathtext), which a linear axis never does
    assert "10^{" in log
    assert "10^{" not in linear
    assert "Parameters per epoch (before each update)" in log  # the w panel is still there


def test_plot_draws_the_held_out_loss_of_a_fit_with_a_split(client: TestClient) -> None:
    x = [float(i) for i in range(1, 13)]
    body = {"x": x, "y": [2 * v + 0.5 * (-1) ** i for i, v in enumerate(x)], "seed": 4}
    split = client.post("/fit", json={**body, "validation_fraction": 0.25}).json()
    plain = client.post("/fit", json=body).json()
    for job in (split, plain):
        assert wait_job(client, job["id"])["status"] == "succeeded"
    for log in ("false", "true"):
        params = {"format": "svg", "log": log}
        with_split = client.get("/history/plot", params={**params, "job_id": split["id"]}).text
        without = client.get("/history/plot", params={**params, "job_id": plain["id"]}).text
        assert ">held-out loss<" in with_split  # a second line, and a legend that names both
        assert ">loss<" in with_split
        assert "held-out loss" not in without


def test_log_plot_of_losses_that_are_zero_tiny_or_huge(app: TestClient) -> None:
    """A loss of exactly 0 has no logarithm: it is drawn at the smallest positive loss, and the
    plot says how many were; losses beyond matplotlib's range are drawn at its edge."""
    store = store_of(app)
    job = fake_job(store, 6)
    losses = [4.0, 0.5, 0.0, 0.001, 0.0, 0.25]
    store.append_history(job.id, array("d", [1.0] * 6), None, array("d", losses))
    svg = app.get("/history/plot", params={"job_id": job.id, "format": "svg", "log": "true"})
    assert svg.status_code == 200
    assert "losses: 2 of 0 drawn at 0.001" in svg.text
    png = app.get("/history/plot", params={"job_id": job.id, "log": "true"})
    assert png.content.startswith(PNG_MAGIC)

    for extremes, note in [
        ([0.0, 0.0], "losses: 2 of 0 drawn at 1"),  # nothing positive: any decade will do
        (
            [1.7e308, 5e-324, 0.0],
            "losses: 1 of 0 drawn at 1e-100; 1 below 1e-100 drawn there; "
            "1 above 1e+100 drawn there",
        ),
    ]:
        job = fake_job(store, len(extremes))
        w = array("d", [1.0] * len(extremes))
        store.append_history(job.id, w, None, array("d", extremes))
        params = {"job_id": job.id, "log": "true"}
        assert app.get("/history/plot", params=params).content.startswith(PNG_MAGIC)
        svg = app.get("/history/plot", params={**params, "format": "svg"})
        assert svg.status_code == 200
        assert note in svg.text


def test_linear_plot_of_values_near_the_largest_float(app: TestClient) -> None:
    """Found by Schemathesis: a fit that diverged recorded losses up to 1.39e308, and the
    linear plot answered 500 (matplotlib's limits overflowed). Values beyond 1e300 are drawn
    at it, and the plot says how many."""
    store = store_of(app)
    job = fake_job(store, 4)
    losses = [1.0, 1e300, 1.39e308, 1.7976931348623157e308]
    w = [1.0, -1.7976931348623157e308, 3e154, 1e301]
    store.append_history(job.id, array("d", w), None, array("d", losses))
    for image in ("png", "svg"):
        r = app.get("/history/plot", params={"job_id": job.id, "format": image})
        assert r.status_code == 200, r.text
    svg = app.get("/history/plot", params={"job_id": job.id, "format": "svg"}).text
    assert "losses: 2 beyond ±1e+300 drawn there" in svg
    assert svg.count("2 beyond ±1e+300 drawn there") == 2  # and 2 values of w


def test_the_plot_of_a_fit_that_diverged_is_drawn(client: TestClient) -> None:
    """Schemathesis's case, end to end: the fit fails `diverged`, its plot is still drawn."""
    r = client.post("/fit", json={"x": [820_000_000], "y": [0], "batch_size": None})
    job = wait_job(client, r.json()["id"])
    assert job["error"]["type"] == "diverged"
    for params in ({}, {"format": "svg"}, {"log": "true"}):
        plot = client.get("/history/plot", params={"job_id": job["id"], **params})
        assert plot.status_code == 200, plot.text


def test_log_plot_of_a_job_without_epochs(app: TestClient) -> None:
    job = fake_job(store_of(app), 5)
    r = app.get("/history/plot", params={"job_id": job.id, "format": "svg", "log": "true"})
    assert r.status_code == 200
    assert "no epochs recorded yet" in r.text


@pytest.mark.parametrize("value", ["yes", "1", "True", "on", "", "null"])
def test_log_is_a_strict_boolean(client: TestClient, value: str) -> None:
    """Only true and false, as JSON writes them: a bad value is a 422 naming the parameter."""
    client.post("/fit", json=TUTORIAL)
    wait_until(lambda: client.get("/history").status_code == 200, what="a history")
    r = client.get("/history/plot", params={"log": value})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"] == "validation-error"
    assert [(e["field"], e["message"]) for e in problem["errors"]] == [
        ("log", "Input should be true or false")
    ]


def test_plot_of_a_queued_job_is_404(app: TestClient) -> None:
    c = app
    job, _ = store_of(c).create_job(job_params(5), 3)  # queued: not started
    r = c.get("/history/plot", params={"job_id": job.id})
    assert r.status_code == 404
    assert r.json()["type"] == "history-not-found"


def test_matplotlib_is_imported_only_for_a_plot() -> None:
    code = """
import sys
from fastapi.testclient import TestClient
import service.__main__, service.client
from service.http.app import create_app
from service.core.settings import Settings
with TestClient(create_app(Settings()), base_url="http://localhost") as c:
    assert c.get("/").status_code == 200
    assert c.get("/static/page.js").status_code == 200
    assert c.get("/history/plot").status_code == 404  # no job yet: nothing to draw
    print("before", "matplotlib" in sys.modules)
    from service.core import render
    from service.core.schemas import History
    render.render_history(History(job_id="j", status="running", total_epochs=0, since=0,
        stride=1, count=0, next_since=0, epoch=[], w=[], loss=[]), "png")
    print("after", "matplotlib" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["before", "False", "after", "True"], out.stderr


# -- live events ------------------------------------------------------------------------------


def test_events_carry_every_grid_epoch_once_then_the_end(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job = fake_job(store, 5000)
    thread = feeder(store, job.id, 5000, per_tick=50, tick=0.01)
    started = time.monotonic()
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = read_events(r.iter_lines())
    elapsed = time.monotonic() - started
    thread.join(TIMEOUT)

    progress, end = events[:-1], events[-1]
    assert {e.event for e in progress} == {"progress"}
    assert progress_epochs(events) == grid(5000)  # stride 5: no gaps, no repeats, in order
    for e in progress:
        assert e.data["w"] == [float(x) for x in e.data["epoch"]]
        assert e.data["loss"] == [1.0 / (x + 1) for x in e.data["epoch"]]
        assert e.data["b"] is None
        assert e.id == str(e.data["epoch"][-1] + 1)  # the epoch a resumed stream starts at
        assert e.data["progress"]["epochs"] == 5000
    assert len(progress) >= 5, "events must arrive while the job runs, not only at its end"
    assert len(progress) <= 20 * elapsed + 2, f"{len(progress)} events in {elapsed:.2f}s"
    assert (end.event, end.id) == ("end", "end")
    assert end.data["status"] == "succeeded"
    assert end.data["result"]["w"] == 2.0


def test_events_are_at_most_about_20_per_second(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job = fake_job(store, 1000)
    thread = feeder(store, job.id, 1000, per_tick=1, tick=0.002)  # 500 epochs/s, for ~2 s
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        events = read_events(r.iter_lines())
    thread.join(TIMEOUT)
    progress = [e for e in events if e.event == "progress"]
    assert progress_epochs(events) == list(range(1000))
    assert len(progress) >= 10
    rate = (len(progress) - 1) / (progress[-1].at - progress[0].at)
    assert rate <= 22, f"{rate:.1f} events per second"


def test_a_stream_resumes_at_last_event_id_without_gaps_or_repeats(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job = fake_job(store, 30_000, fit_intercept=True)
    stride = 30  # 30,000 epochs over EVENT_POINTS = 1,000 points

    def run() -> None:
        for start in range(0, 30_000, 1_111):  # chunks off the grid: the cut must not matter
            feed(store, job.id, start, min(30_000, start + 1_111), with_b=True)
            time.sleep(0.01)
        store.end_job(job.id, JobStatus.cancelled)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        first = read_events(r.iter_lines(), stop_after=3)
    last_id = first[-1].id
    assert last_id is not None
    with c.stream("GET", f"/jobs/{job.id}/events", headers={"Last-Event-ID": last_id}) as r:
        assert r.status_code == 200
        rest = read_events(r.iter_lines())
    thread.join(TIMEOUT)

    epochs = progress_epochs(first) + progress_epochs(rest)
    assert epochs == [*range(0, 30_000, stride), 29_999]
    assert progress_epochs(rest)[0] == int(last_id) - 1 + stride  # the next grid epoch
    b = [v for e in first + rest if e.event == "progress" for v in e.data["b"]]
    assert b == [-float(x) for x in epochs]
    assert rest[-1].event == "end"
    assert rest[-1].data["status"] == "cancelled"

    # After the end: resuming from any id replays exactly the rest; 'end' means nothing is left.
    with c.stream("GET", f"/jobs/{job.id}/events", headers={"Last-Event-ID": "15000"}) as r:
        tail = read_events(r.iter_lines())
    assert progress_epochs(tail) == [*range(15_000, 30_000, stride), 29_999]
    r2 = c.get(f"/jobs/{job.id}/events", headers={"Last-Event-ID": "end"})
    assert r2.status_code == 204
    assert r2.content == b""


def test_the_last_epoch_of_a_job_that_stopped_early_is_sent(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job = fake_job(store, 10_000)  # stride 10
    feed(store, job.id, 0, 1234)
    problem = {"type": "diverged", "title": "The fit diverged", "status": 422, "detail": "d"}
    store.end_job(job.id, JobStatus.failed, problem)
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        events = read_events(r.iter_lines())
    assert progress_epochs(events) == [*range(0, 1234, 10), 1233]
    assert events[-1].data["status"] == "failed"
    assert events[-1].data["error"]["type"] == "diverged"


def test_a_queued_job_streams_once_it_runs(app: TestClient) -> None:
    c = app
    store = store_of(c)
    job, _ = store.create_job(job_params(5), 3)  # queued: no history yet

    def run() -> None:
        time.sleep(0.3)
        assert store.start_job(job.id) is not None
        feed(store, job.id, 0, 5)
        store.succeed_job(job.id, FitReport.plain(2.0, 0.0, 0.0, 0.0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        events = read_events(r.iter_lines())
    thread.join(TIMEOUT)
    assert progress_epochs(events) == [0, 1, 2, 3, 4]
    assert events[-1].data["status"] == "succeeded"


def test_a_job_cancelled_while_queued_streams_only_its_end(
    app: TestClient,
) -> None:
    c = app
    store = store_of(c)
    job, _ = store.create_job(job_params(5), 3)
    store.end_job(job.id, JobStatus.cancelled)
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        events = read_events(r.iter_lines())
    assert [e.event for e in events] == ["end"]
    assert events[0].data["status"] == "cancelled"


# b"\xb2" arrives as "²", which str.isdigit() accepts and int() does not.
@pytest.mark.parametrize("last_event_id", [b"abc", b"-1", b"1.5", b"9" * 19, b"\xb2", b""])
def test_a_bad_last_event_id_is_a_problem(app: TestClient, last_event_id: bytes) -> None:
    c = app
    job = fake_job(store_of(c), 5)
    r = c.get(f"/jobs/{job.id}/events", headers={"Last-Event-ID": last_event_id})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    # the header, named as a caller sends it (header names are case-insensitive)
    assert r.json()["errors"][0]["field"] == "last-event-id"


def test_events_of_an_unknown_job_are_404(client: TestClient) -> None:
    r = client.get("/jobs/nope/events")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "job-not-found"


def test_a_quiet_stream_sends_keep_alive_comments(
    app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "KEEPALIVE_SECONDS", 0.1)
    c = app
    job = fake_job(store_of(c), 5)  # never fed: a quiet stream
    comments = 0
    with c.stream("GET", f"/jobs/{job.id}/events") as r:
        for line in r.iter_lines():
            comments += line == ": keep-alive"
            if comments == 2:
                break
    assert comments == 2


# -- a slow client against a real server --------------------------------------------------------


@pytest.fixture
def live_server(default_server: Server) -> Server:
    """The run's shared default server: these tests never need an empty one."""
    return default_server


# About two seconds of work in any engine: 1,024 samples drawn every epoch, 1,000 grid points.
MEASURED_FIT = {**TUTORIAL, "epochs": 2_000, "batch_size": 1_024, "seed": 4}


def fit_seconds(ended: dict[str, Any]) -> float:
    assert ended["status"] == "succeeded"
    job = Job.model_validate(ended)
    assert job.started_at is not None
    assert job.finished_at is not None
    return (job.finished_at - job.started_at).total_seconds()


def stalled_reader(url: str, path: str) -> socket.socket:
    """Ask for an event stream and never read it: the server's sends to it back up."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(TIMEOUT)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_a_slow_client_does_not_slow_the_fit(live_server: Server) -> None:
    with live_server.client() as http:
        job = http.post("/fit", json=MEASURED_FIT).json()
        baseline = fit_seconds(wait_job(http, job["id"], deadline=120))
        job = http.post("/fit", json=MEASURED_FIT).json()
        readers = [stalled_reader(live_server.url, f"/jobs/{job['id']}/events") for _ in range(4)]
        try:
            slowed = fit_seconds(wait_job(http, job["id"], deadline=120))
            assert http.get("/predict", params={"hours": 4}).status_code == 200
            with http.stream("GET", f"/jobs/{job['id']}/events") as r:  # others still stream
                assert progress_epochs(read_events(r.iter_lines())) == grid(2_000)
        finally:
            for sock in readers:
                sock.close()
    assert slowed < 2 * baseline + 1.0, f"{slowed:.2f}s with stalled readers, {baseline:.2f}s"


def test_a_real_server_streams_the_tutorial_fit(live_server: Server) -> None:
    with live_server.client() as http:
        job = http.post("/fit", json={**TUTORIAL, "seed": 5}).json()
        with http.stream("GET", f"/jobs/{job['id']}/events", timeout=TIMEOUT) as r:
            events = read_events(r.iter_lines())
    assert progress_epochs(events) == list(range(100))
    assert events[-1].data["result"]["w"] == pytest.approx(2.0, abs=1e-3)


# -- the page ---------------------------------------------------------------------------------


def test_the_page_is_served_with_its_assets(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    html = r.text
    for element in ("fit-form", "loss-chart", "param-chart", "score", "served", "versions", "jobs"):
        assert f'id="{element}"' in html
    # the fit's optional fields, and the loss chart's log scale
    for element in ("validation_fraction", "tol", "n_iter_no_change", "publish", "init_from"):
        assert f'id="{element}"' in html
    assert 'id="log-scale" type="checkbox"' in html
    assert "No fit yet" not in html  # the page says so only once it knows
    assert 'value="1, 2, 3"' in html  # the tutorial's data is prefilled
    assert 'value="2, 4, 6"' in html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/page.js" in refs
    assert "/static/page.css" in refs
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "//")), f"{ref}: load nothing from elsewhere"
    for asset, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
        a = client.get(f"/static/{asset}")
        assert a.status_code == 200
        assert a.headers["content-type"].startswith(media)
        assert not re.search(r"https?://", a.text), f"{asset} must not load from elsewhere"


@pytest.mark.parametrize("name", ["nope.js", "..%2Fviews.py", "index.html.bak"])
def test_unknown_assets_are_404_problems(client: TestClient, name: str) -> None:
    r = client.get(f"/static/{name}")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


def test_openapi_lists_every_status_of_the_views(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        ("/history/plot", "get"): {"200", "404", "422", "503"},  # too-many-plots
        ("/jobs/{job_id}/events", "get"): {"200", "204", "404", "422", "503"},  # too-many-streams
        ("/", "get"): {"200"},
        ("/static/{name}", "get"): {"200", "404", "422"},
    }
    for (path, method), codes in expected.items():
        assert set(paths[path][method]["responses"]) == codes, path
    plot = paths["/history/plot"]["get"]["responses"]["200"]["content"]
    assert set(plot) == {"image/png", "image/svg+xml"}
    log = next(p for p in paths["/history/plot"]["get"]["parameters"] if p["name"] == "log")
    assert (log["in"], log["schema"]["type"], log["schema"]["default"]) == (
        "query",
        "boolean",
        False,
    )
    events = paths["/jobs/{job_id}/events"]["get"]
    stream = events["responses"]["200"]["content"]["text/event-stream"]["schema"]
    kinds = [option["properties"]["event"]["const"] for option in stream["oneOf"]]
    assert kinds == ["progress", "end", "problem"]
    headers = [p for p in events["parameters"] if p["in"] == "header"]
    assert [h["name"] for h in headers] == ["Last-Event-ID"]
    assert headers[0]["schema"]["type"] == "string"  # not null: it would be sent as "null"
    assert re.fullmatch(headers[0]["schema"]["pattern"], "123")
    assert re.fullmatch(headers[0]["schema"]["pattern"], "end")
