"""The in-memory runner (JobRunner): a bounded queue, one long-lived training worker process,
progress, cancel.

Fits run in a separate process (service.runner.worker, started once, at a lower CPU priority) so
that neither the GIL nor the CPU a fit takes slows /predict. A dispatcher thread in the server
feeds the worker one job at a time and writes what it streams back (history chunks, then the
outcome) into the store.

The worker may die at any moment (the OOM killer, kill -9). The dispatcher waits on the worker's
pipe, its process sentinel and a wake-up pipe at once, so it sees a death as it happens, busy or
idle, and starts a replacement (service.runner.supervisor: the back-off, the hello, the stop);
/readyz is 503 until that one is ready. A job whose worker died is run again on the
replacement (the recorded seed makes the run identical), up to SGD_JOB_ATTEMPTS attempts:
at-least-once. The runner's lock guards only its own fields and is never held while talking to
the worker, and no exception ends the dispatcher's loop.
"""

import atexit
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core.errors import (
    JobAlreadyEnded,
    JobTimedOut,
    ServiceError,
    WorkerCrashed,
)
from service.core.logs import log_job
from service.core.processes import fork_context
from service.core.schemas import FitReport, Job, JobParams, JobStatus
from service.core.settings import Settings
from service.runner import supervisor, worker
from service.runner.base import draining, shutting_down, starting
from service.runner.supervisor import StartFailed, StartFailures, WorkerProcess
from service.state.base import Store

log = logging.getLogger("sgd_service.jobs")

# How long the worker, sent Stop, gets to exit before it is killed: it reads the pipe between
# blocks of epochs, each well under a second.
WORKER_EXIT_SECONDS = 1.0
# How long a worker gets to stop a fit that ran out of time (it checks between blocks, each well
# under a second) before it is replaced.
TIMEOUT_GRACE_SECONDS = 10.0


class WorkerLost(Exception):
    """The worker died, or its pipe broke, while it had a job."""


@dataclass(frozen=True)
class _Pending:
    job_id: str
    x: worker.Samples  # float64, native byte order
    y: worker.Samples


class _Worker(WorkerProcess):
    """The worker process: a fit and its samples go down the pipe, its history and its outcome
    come back (service.runner.worker); used by the dispatcher thread only."""

    def __init__(self, ctx: Any, settings: Settings) -> None:
        s = settings
        args = (s.torch_threads, s.worker_nice, s.worker_sched_idle)
        super().__init__(ctx, worker.main, args, "sgd-worker")
        _LIVE_WORKERS.add(self)
        self.chan = worker.Channel(self.conn)

    def send(self, msg: object) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError) as exc:
            raise WorkerLost(f"could not write to the training worker: {exc!r}") from exc

    def send_raw(self, *buffers: bytes | bytearray) -> None:
        """A fit's samples, after its message: the kernel copies them, the GIL free (pickling
        2 x 8 MB held it ~8 ms, and /predict waited)."""
        try:
            self.chan.send_raw(*buffers)
        except OSError as exc:
            raise WorkerLost(f"could not write to the training worker: {exc!r}") from exc

    def died(self) -> str:
        return f"the training worker exited with code {self.exit_code(WORKER_EXIT_SECONDS)}"

    def ask_to_stop(self) -> None:
        """By message: the worker ignores SIGTERM, which a terminal sends its whole group."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(worker.Stop())

    def close(self) -> None:
        _LIVE_WORKERS.discard(self)
        self.chan.close()
        super().close()


# The worker ignores SIGTERM, so multiprocessing's own exit handler, which terminates and then
# joins daemon children, would wait forever for one that a crashed server left behind.
_LIVE_WORKERS: "weakref.WeakSet[_Worker]" = weakref.WeakSet()


@atexit.register
def _kill_live_workers() -> None:
    for w in list(_LIVE_WORKERS):
        w.kill()


class JobRunner:
    """Owns the queue and the worker process; the store owns the state they produce."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self._store = store
        self._on_end = on_end
        self._settings = settings
        self._ctx = fork_context()
        # Guards the fields below; held for a few assignments, never while talking to the worker.
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._current: str | None = None
        self._cancel_asked = False
        self._draining = False
        self._stopping = False
        # Written by the dispatcher thread only; others read them as plain values.
        self._worker: _Worker | None = None
        self._worker_ready = False
        self._starts = StartFailures()
        self.worker_info: dict[str, Any] = {}
        # Anyone wakes the dispatcher by writing a byte: no lock, and a full pipe is awake already.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._dispatch, name="sgd-dispatcher", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher; it starts the worker, forked from a fork server that imports
        torch once (the dispatcher waits for that import, ~1 s, before its first fork)."""
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Can take work: not draining, not broken, a worker alive and warm, the dispatcher up."""
        return (
            not self._draining
            and self._worker_ready
            and self._starts.broken is None
            and self._thread.is_alive()
        )

    def not_ready(self) -> ServiceError:
        if self._draining:
            return draining()
        return starting()

    @property
    def broken(self) -> str | None:
        """Why the runner can never train again (the process should exit), or None."""
        if self._starts.broken is not None:
            return self._starts.broken
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopping:
            return "the dispatcher thread has stopped"
        return None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def drain(self) -> None:
        """Refuse new fits and cancel every queued and running job."""
        with self._lock:
            self._draining = True
            pending, self._queue = list(self._queue), deque()
            if self._current is not None:
                self._cancel_asked = True
        self._wake()
        for p in pending:
            self._end(p.job_id, JobStatus.cancelled)

    def stop(self, timeout: float = 10.0) -> None:
        """Drain, wait for the running fit to stop, then end the worker."""
        self.drain()
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():  # stuck on a worker that does not answer: take it away
            log.error("the dispatcher did not stop within %.0fs; killing the worker", timeout)
            current = self._worker
            if current is not None:
                current.kill()
            self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- requests --------------------------------------------------------------------------

    def submit(
        self,
        params: JobParams,
        n_samples: int,
        x: worker.Samples,
        y: worker.Samples,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Create and queue a job (or find the key's original), or raise QueueFull or
        ShuttingDown. Under the runner's lock, so the job is in the queue as it is created."""
        with self._lock:
            if self._draining:
                raise shutting_down()
            limit = self._settings.max_queued_jobs
            rows = (b"".join(x), b"".join(y)) if self._settings.retrain_fit_rows else None
            job, created = self._store.create_job(params, n_samples, idempotency, limit, rows)
            if created:
                self._queue.append(_Pending(job.id, x, y))
        if created:
            self._wake()
        return job, created

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or ask the running one to stop after its current chunk."""
        job = self._store.get_job(job_id)
        if job.status.ended:
            raise JobAlreadyEnded(f"job {job_id} already ended as {job.status.value}")
        with self._lock:
            running = job_id == self._current
            if running:
                self._cancel_asked = True
            else:
                self._queue = deque(p for p in self._queue if p.job_id != job_id)
        if running:
            self._wake()
            return job
        job = self._store.end_job(job_id, JobStatus.cancelled)  # JobAlreadyEnded if it just did
        self._ended(job)
        return job

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    # -- the dispatcher thread -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Feed the worker one job at a time until stop(); no exception ends this loop."""
        try:
            while not self._stopping:
                try:
                    self._step()
                except Exception:
                    log.exception("dispatcher error; replacing the training worker")
                    self._lose_worker()
        finally:
            self._lose_worker()

    def _step(self) -> None:
        if self._worker is None and not self._draining and self._starts.broken is None:
            self._start_worker()
            return
        pending = self._next()
        if pending is not None:
            self._run(*pending)

    def _next(self) -> tuple[_Pending, Job] | None:
        """The next job, marked running; None after waiting for something to happen."""
        with self._lock:
            while self._queue and self._worker_ready and not self._draining:
                pending = self._queue.popleft()
                job = self._store.start_job(pending.job_id)
                if job is not None:  # None: cancelled (or evicted) while queued
                    self._current, self._cancel_asked = job.id, False
                    return pending, job
        # Idle: sleep until woken, and watch the worker, which can die between fits too.
        current = self._worker
        watched: list[Any] = [self._wake_r]
        if current is not None:
            watched += [current.conn, current.sentinel]
        ready = mp.connection.wait(watched)
        self._drain_wake()
        if current is not None and (current.conn in ready or current.sentinel in ready):
            # While idle the worker sends nothing: this is its end of the pipe closing.
            log.error("%s while idle; starting a new one", current.died())
            self._lose_worker()
        return None

    def _start_worker(self) -> None:
        """Start a worker and wait for its hello; backs off after failed starts."""
        delay = self._starts.backoff()
        if delay and self._sleep(delay):
            return
        try:
            self._worker = new = _Worker(self._ctx, self._settings)
        except StartFailed as exc:
            self._starts.failed(str(exc))
            return
        while True:
            ready = mp.connection.wait([new.conn, new.sentinel, self._wake_r])
            self._drain_wake()
            if self._stopping or self._draining:
                self._lose_worker()  # a shutdown never brings up a worker
                return
            if new.conn in ready or new.sentinel in ready:
                break
        hello = new.hello() if new.conn in ready else None
        if hello is None:
            reason = new.died()
            self._lose_worker()
            self._starts.failed(reason)
            return
        self.worker_info = hello.info
        self._starts.succeeded()
        self._worker_ready = True
        log.info("training worker ready: %s", hello.info)

    def _sleep(self, seconds: float) -> bool:
        """Wait, waking early for stop or drain; True if the runner is stopping or draining."""
        mp.connection.wait([self._wake_r], seconds)
        self._drain_wake()
        return self._stopping or self._draining

    def _lose_worker(self) -> None:
        """Forget the worker: not ready until a new one says hello."""
        self._worker_ready = False
        gone, self._worker = self._worker, None
        if gone is not None:
            supervisor.stop([gone], WORKER_EXIT_SECONDS)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _run(self, pending: _Pending, job: Job) -> None:
        """Run a job to its end: again on a new worker if one dies under it."""
        log_job(job)
        deadline = time.monotonic() + self._settings.job_timeout
        ended: Job | None = None
        try:
            while True:
                try:
                    ended = self._attempt(job, pending, deadline)
                    break
                except WorkerLost as exc:
                    log.error("job %s, attempt %d: %s", job.id, job.attempts, exc)
                    self._lose_worker()
                    ended, again = self._after_loss(job, str(exc), deadline)
                    if not again:
                        break
                    job = self._store.retry_job(job.id)
                    log_job(job)
        except Exception:
            # The store failed us: fail the job so that it does not stay running for ever, and
            # start afresh with a new worker (this one may still be streaming into the pipe).
            log.exception("job %s: could not record the fit; failing it", job.id)
            self._lose_worker()
            problem = ServiceError("the service could not record the fit; retry it").problem()
            ended = self._end(job.id, JobStatus.failed, problem, report=False)
        finally:
            with self._lock:
                self._current, self._cancel_asked = None, False
        if ended is not None:
            self._ended(ended)

    def _after_loss(self, job: Job, reason: str, deadline: float) -> tuple[Job | None, bool]:
        """How a job goes on when its worker died: (its end, False), or (None, True) to rerun.

        It runs again once a new worker is ready, unless it has had all its attempts or its
        time, was cancelled meanwhile, or the runner is stopping.
        """
        attempts, limit = job.attempts, self._settings.job_attempts
        problem: dict[str, Any] | None = None
        if time.monotonic() >= deadline:
            problem = JobTimedOut(self._settings.job_timeout).problem()
        elif attempts >= limit:
            problem = WorkerCrashed.every_attempt(attempts, limit, attempts, reason).problem()
        while problem is None and not (self._cancel_asked or self._draining or self._stopping):
            if self._worker_ready:
                return None, True
            broken = self._starts.broken
            if broken is not None:
                problem = WorkerCrashed(f"{broken}; retry on another replica").problem()
            else:
                self._start_worker()
        if problem is None:
            return self._end(job.id, JobStatus.cancelled, report=False), False
        return self._end(job.id, JobStatus.failed, problem, report=False), False

    def _attempt(self, job: Job, pending: _Pending, deadline: float) -> Job | None:
        """One run of the job on the current worker: its end (None if that could not be
        recorded), or raises WorkerLost. Past the deadline the fit is cancelled as timed out."""
        current = self._worker
        assert current is not None
        current.send(worker.Fit(job.id, job.params.model_dump(), job.n_samples))
        current.send_raw(*pending.x, *pending.y)
        cancel_sent = timed_out = False
        while True:
            if (self._cancel_asked or timed_out) and not cancel_sent:
                current.send(worker.Cancel(job.id))
                cancel_sent = True
            until = deadline + (TIMEOUT_GRACE_SECONDS if timed_out else 0.0)
            watched: list[Any] = [current.conn, current.sentinel, self._wake_r]
            ready = mp.connection.wait(watched, max(0.0, until - time.monotonic()))
            self._drain_wake()
            if current.conn in ready:
                ended = self._receive(job, current, timed_out)
                if ended is not None:
                    return ended
            elif current.sentinel in ready:
                raise WorkerLost(current.died())
            elif time.monotonic() >= until:
                if timed_out:  # it did not stop in its grace time: take it away
                    self._lose_worker()
                    return self._timed_out(job)
                log.warning("job %s ran out of time; stopping it", job.id)
                timed_out = True

    def _timed_out(self, job: Job) -> Job | None:
        problem = JobTimedOut(self._settings.job_timeout).problem()
        return self._end(job.id, JobStatus.failed, problem, report=False)

    def _receive(self, job: Job, current: _Worker, timed_out: bool) -> Job | None:
        """Handle one message of the running job; the job once it has ended."""
        try:
            msg = current.conn.recv()
            if isinstance(msg, worker.Chunk):
                cols = {name: current.chan.recv_floats(msg.count) for name in msg.columns}
        except (EOFError, OSError) as exc:
            raise WorkerLost(f"lost the training worker: {exc!r}") from exc
        if isinstance(msg, worker.Chunk):
            w, b, loss, val = cols["w"], cols.get("b"), cols["loss"], cols.get("val_loss")
            self._store.append_history(job.id, w, b, loss, val_loss=val)
            return None
        if isinstance(msg, worker.Done):
            return self._store.succeed_job(job.id, FitReport.model_validate(msg.report))
        if isinstance(msg, worker.Cancelled):
            if timed_out and not self._cancel_asked:
                return self._timed_out(job)
            return self._store.end_job(job.id, JobStatus.cancelled)
        if isinstance(msg, worker.Failed):
            return self._store.end_job(job.id, JobStatus.failed, msg.problem)
        raise TypeError(f"unexpected message from the training worker: {msg!r}")

    # -- ending jobs -----------------------------------------------------------------------

    def _end(
        self,
        job_id: str,
        status: JobStatus,
        problem: dict[str, Any] | None = None,
        report: bool = True,
    ) -> Job | None:
        """End a job if it has not ended yet; never raises (a failure is logged)."""
        try:
            job = self._store.end_job(job_id, status, problem)
        except ServiceError:  # it ended (or was evicted) meanwhile: nothing left to do
            return None
        except Exception:
            log.exception("job %s: could not record its end as %s", job_id, status.value)
            return None
        if report:
            self._ended(job)
        return job

    def _ended(self, job: Job) -> None:
        try:
            log_job(job)
            if self._on_end is not None:
                self._on_end(job)
        except Exception:
            log.exception("job %s: reporting its end failed", job.id)
