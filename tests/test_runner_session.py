"""run_session, the fit loop of both training workers, alone: a sink and an interrupt check of the
test's own, no process, no pipe, no Redis."""

from array import array
from typing import Any

import pytest

from service.core.errors import JobTimedOut
from service.core.schemas import JobStatus
from service.runner.session import run_session

# The tutorial's fit: y = 2x, w from 1.0, 100 epochs of one sample at learning rate 0.01.
SAMPLES = (array("d", [1.0, 2.0, 3.0]).tobytes(), array("d", [2.0, 4.0, 6.0]).tobytes())
TUTORIAL = {"epochs": 100, "learning_rate": 0.01, "init_w": 1.0, "batch_size": 1, "seed": 7}
# minutes of work: every test that runs it stops it early
SLOW = {**TUTORIAL, "epochs": 100_000_000}


class Sink:
    """Keeps what it is given; refuses the first `refuse` writes that are not final."""

    def __init__(self, refuse: int = 0) -> None:
        self.w: list[float] = []
        self.loss: list[float] = []
        self.b: list[float] = []
        self.names: list[str] = []  # the last write's columns
        self.refused = 0
        self.refuse = refuse

    def write(self, history: dict[str, bytes], final: bool) -> bool:
        if self.refused < self.refuse and not final:
            self.refused += 1
            return False
        self.w += array("d", history["w"])
        self.loss += array("d", history["loss"])
        self.b += array("d", history.get("b", b""))
        self.names = list(history)
        return True


def never() -> bool:
    return False


def test_the_tutorial_fit_succeeds_with_its_whole_history() -> None:
    sink = Sink()
    outcome = run_session(SAMPLES, TUTORIAL, sink, never)
    assert outcome.status is JobStatus.succeeded
    assert outcome.problem is None
    assert outcome.report is not None
    assert outcome.report.w == pytest.approx(2.0, abs=1e-3)
    assert outcome.report.epochs_run == 100
    assert len(sink.w) == len(sink.loss) == 100
    assert sink.w[0] == 1.0  # w before the first update


def test_an_interrupt_cancels_the_fit_after_a_chunk_its_history_written() -> None:
    sink = Sink()
    asked = 0

    def interrupted() -> bool:
        nonlocal asked
        asked += 1
        return True

    outcome = run_session(SAMPLES, SLOW, sink, interrupted)
    assert outcome.status is JobStatus.cancelled
    assert outcome.report is None
    assert asked == 1
    assert 0 < len(sink.w) < SLOW["epochs"]


def test_what_the_sink_refuses_is_kept_for_the_next_write() -> None:
    sink = Sink(refuse=2)
    outcome = run_session(SAMPLES, SLOW, sink, lambda: bool(sink.w))
    assert outcome.status is JobStatus.cancelled
    assert sink.refused == 2
    # what the refused writes held came with the next: the history from its first epoch
    assert len(sink.w) == len(sink.loss) > 0
    assert sink.w[0] == 1.0


def test_a_time_limit_raised_by_the_interrupt_fails_the_fit_with_its_problem() -> None:
    def timed_out() -> bool:
        raise JobTimedOut(1.0)

    sink = Sink()
    outcome = run_session(SAMPLES, SLOW, sink, timed_out)
    assert outcome.status is JobStatus.failed
    assert outcome.problem is not None
    assert outcome.problem["type"].endswith("timeout")
    assert outcome.crash is None
    assert sink.w  # the history so far is written before the end


def test_a_diverging_fit_fails_diverged() -> None:
    outcome = run_session(SAMPLES, {**TUTORIAL, "learning_rate": 100.0}, Sink(), never)
    assert outcome.status is JobStatus.failed
    assert outcome.problem is not None
    assert outcome.problem["type"].endswith("diverged")


def test_anything_else_the_fit_raises_is_a_worker_crash_with_the_exception() -> None:
    def broken() -> bool:
        raise ZeroDivisionError("a bug")

    outcome = run_session(SAMPLES, SLOW, Sink(), broken)
    assert outcome.status is JobStatus.failed
    assert outcome.problem is not None
    assert outcome.problem["type"].endswith("worker-crashed")
    assert "ZeroDivisionError('a bug')" in outcome.problem["detail"]
    assert isinstance(outcome.crash, ZeroDivisionError)


class _Leave(BaseException):
    pass


def test_a_base_exception_from_the_sink_goes_through_unreported() -> None:
    class Leaving(Sink):
        def write(self, history: dict[str, Any], final: bool) -> bool:
            raise _Leave

    with pytest.raises(_Leave):
        run_session(SAMPLES, TUTORIAL, Leaving(), never)


def test_the_history_columns_are_w_and_loss_then_b_with_an_intercept() -> None:
    sink = Sink()
    run_session(SAMPLES, {**TUTORIAL, "fit_intercept": True}, sink, never)
    assert sink.names == ["w", "loss", "b"]
    assert len(sink.b) == 100
