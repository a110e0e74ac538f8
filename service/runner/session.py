"""One fit in a training worker process, the same in both modes: its history to a sink, then its
outcome.

Only the worker processes import this (it imports torch, through the engine). Each adapts the
two ends: the in-memory runner's worker writes to its pipe and is cancelled by a message on it
(service.runner.worker); a queue worker writes to Redis with its attempt number and is
interrupted by a cancel flag, its own stop or the job's time limit (service.runner.queue_worker).
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from service.core import engine
from service.core.errors import Diverged, InvalidInput, JobTimedOut, WorkerCrashed
from service.core.schemas import FitReport, JobStatus

# A fit's history goes out at most this often: a bounded rate of writes, and fresh progress.
FLUSH_SECONDS = 0.05


class Sink(Protocol):
    """Where a fit's history goes: the worker's pipe to its runner, or Redis."""

    def write(self, history: dict[str, bytes], final: bool) -> bool:
        """Record the next epochs' history (columns(), after those written before); False keeps
        them for the next write. A final write records them or raises."""


@dataclass(frozen=True)
class Outcome:
    """How a fit ended: succeeded with its report, failed with a problem, or cancelled."""

    status: JobStatus
    report: FitReport | None = None
    problem: dict[str, Any] | None = None
    crash: Exception | None = None  # what the fit raised that it never should, for the log


def run_session(
    samples: tuple[bytes, bytes],
    params: Mapping[str, Any],
    sink: Sink,
    interrupted: Callable[[], bool],
) -> Outcome:
    """Run the fit of x's and y's float64 bytes with a job's params, its history written to the
    sink every FLUSH_SECONDS; interrupted() is asked after every chunk, and True cancels it.

    Errors are its outcome: Diverged, InvalidInput and JobTimedOut (which interrupted() may
    raise) fail it with their problem, its history written first; any other Exception with
    WorkerCrashed. What is not an Exception goes through: the sink and interrupted() raise a
    BaseException to leave the fit unreported (the Redis worker's stop, its lost job).
    """
    x, y = engine.as_tensor(samples[0]), engine.as_tensor(samples[1])
    fit = engine.FitParams.of(params)
    outbox = _Outbox(sink)
    try:
        session = engine.Session(x, y, fit)
        for chunk in session.chunks():
            outbox.add(chunk)
            if interrupted():
                outbox.flush(final=True)
                return Outcome(JobStatus.cancelled)
        outbox.flush(final=True)
        report = session.report()  # raises Diverged unless all finite
    except (Diverged, InvalidInput, JobTimedOut) as exc:
        outbox.flush(final=True)
        return Outcome(JobStatus.failed, problem=exc.problem())
    except Exception as exc:  # reported, and the worker stays alive for the next fit
        problem = WorkerCrashed(f"the fit raised {exc!r}").problem()
        return Outcome(JobStatus.failed, problem=problem, crash=exc)
    return Outcome(JobStatus.succeeded, report=report)


def columns(parts: list[engine.Chunk]) -> dict[str, bytes]:
    """Chunks' history as raw float64 columns by name: w, loss, then b and val_loss if any."""
    out = {name: b"".join(getattr(c, name).tobytes() for c in parts) for name in ("w", "loss")}
    for name in ("b", "val_loss"):
        if getattr(parts[0], name) is not None:
            out[name] = b"".join(getattr(c, name).tobytes() for c in parts)
    return out


class _Outbox:
    """Coalesces chunks into one write every FLUSH_SECONDS, and keeps what the sink could not
    take for the next."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._parts: list[engine.Chunk] = []
        self._last = time.monotonic()

    def add(self, chunk: engine.Chunk) -> None:
        self._parts.append(chunk)
        if time.monotonic() - self._last >= FLUSH_SECONDS:
            self.flush()

    def flush(self, final: bool = False) -> None:
        self._last = time.monotonic()
        if self._parts and self._sink.write(columns(self._parts), final):
            self._parts = []
