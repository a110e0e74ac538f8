"""The supervision both runners share, alone: worker processes of the test's own (spawned, no
torch), their hello, their stop, and the count of failed starts."""

import multiprocessing as mp
import signal
import time
from multiprocessing.connection import Connection

import pytest

from service.runner import supervisor
from service.runner.supervisor import (
    MAX_START_FAILURES,
    START_BACKOFF,
    StartFailures,
    WorkerProcess,
)
from service.runner.worker import Hello

CTX = mp.get_context("spawn")


def greets(conn: Connection) -> None:
    conn.send(Hello({"pid": 1}))
    conn.recv()  # until the pipe closes


def dies(conn: Connection) -> None:
    raise SystemExit(3)


def ignores_sigterm(conn: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send(Hello({}))
    time.sleep(60)


def test_a_worker_says_hello_and_stops_when_asked() -> None:
    w = WorkerProcess(CTX, greets, (), "sgd-test")
    assert w.conn.poll(30)
    hello = w.hello()
    assert hello is not None
    assert hello.info == {"pid": 1}
    supervisor.stop([w], grace=10)
    assert w.conn.closed


def test_a_worker_that_dies_first_has_no_hello_and_an_exit_code() -> None:
    w = WorkerProcess(CTX, dies, (), "sgd-test")
    assert w.conn.poll(30)
    assert w.hello() is None
    assert w.exit_code(10) == 3
    w.close()


def test_a_worker_that_does_not_stop_in_its_grace_is_killed() -> None:
    w = WorkerProcess(CTX, ignores_sigterm, (), "sgd-test")
    assert w.conn.poll(30)
    assert w.hello() is not None
    started = time.monotonic()
    supervisor.stop([w], grace=0.5)
    assert time.monotonic() - started < 10
    assert w.conn.closed


def test_failed_starts_back_off_then_break_and_a_success_resets_them() -> None:
    starts = StartFailures()
    assert starts.backoff() == 0.0
    for n in range(1, MAX_START_FAILURES):
        starts.failed("it died")
        assert starts.backoff() == START_BACKOFF[min(n, len(START_BACKOFF) - 1)]
        assert starts.broken is None
    starts.succeeded()
    assert starts.backoff() == 0.0
    for _ in range(MAX_START_FAILURES):
        starts.failed("it died")
    assert (
        starts.broken == f"the training worker failed to start {MAX_START_FAILURES} times in a row"
    )


@pytest.mark.parametrize("more", [1, 3])
def test_the_broken_reason_stays_the_first(more: int) -> None:
    starts = StartFailures()
    for _ in range(MAX_START_FAILURES + more):
        starts.failed("it died")
    assert starts.broken is not None
    assert str(MAX_START_FAILURES) in starts.broken
