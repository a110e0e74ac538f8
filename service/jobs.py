"""The job runner: a bounded queue, one long-lived training worker process, progress, cancel.

Fits run in a separate process (spawned once, at a lower CPU priority) so that neither the GIL
nor the CPU a fit takes slows /predict. A dispatcher thread in the server feeds the worker one job
at a time and writes what it streams back (history chunks, then the outcome) into the store.
"""

import contextlib
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from service.errors import JobAlreadyEnded, QueueFull, ServiceError, ShuttingDown, WorkerCrashed
from service.schemas import Job, JobStatus
from service.settings import Settings
from service.store import MemoryStore

log = logging.getLogger("sgd_service.jobs")

# The worker sends what it has at most this often: bounded message rate, fresh progress.
FLUSH_SECONDS = 0.05
POLL_SECONDS = 0.2


class _Channel:
    """The pipe to or from the worker: pickled messages, and float64 columns sent raw.

    A history chunk is a small pickled header, then each column's bytes, which the server reads
    straight into one immutable bytes object per column (the kernel copies them while the GIL is
    free) and stores as is. Through pickle it took four copies with the GIL held, and /predict,
    waiting for the GIL, paid for them in its p99.

    The pipe is multiprocessing's duplex Pipe, a Unix socket pair; the raw reads and writes go
    through a socket on the same descriptor, which works because a Connection never reads ahead.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))

    def send_floats(self, columns: list[bytes]) -> None:
        self.conn.send(("chunk", len(columns[0]) // 8, len(columns)))
        for column in columns:
            self._sock.sendall(column)

    def recv_floats(self, count: int) -> "memoryview[float]":
        size = 8 * count
        data = self._sock.recv(size, socket.MSG_WAITALL)
        while len(data) < size:  # a signal can cut MSG_WAITALL short; EOF means the worker died
            more = self._sock.recv(size - len(data), socket.MSG_WAITALL)
            if not more:
                raise EOFError("the worker closed the pipe in the middle of a chunk")
            data += more
        return memoryview(data).cast("d")

    def close(self) -> None:
        self._sock.close()
        self.conn.close()


@dataclass(frozen=True)
class _Pending:
    job_id: str
    x: bytes  # float64, native byte order
    y: bytes


class JobRunner:
    """Owns the queue and the worker process; the store owns the state they produce."""

    def __init__(
        self,
        store: MemoryStore,
        settings: Settings,
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self._store = store
        self._on_end = on_end
        self._settings = settings
        self._ctx = mp.get_context("spawn")  # never fork a process that has threads
        self._cancel = self._ctx.Event()
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._current: str | None = None
        self._stopping = False
        self._draining = False
        self._proc: Any = None
        self._chan: _Channel | None = None
        self._worker_ready = threading.Event()
        self.worker_info: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._dispatch, name="sgd-dispatcher", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the worker (it imports torch once) and the dispatcher thread."""
        self._start_worker()
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Can take work: not draining, worker and dispatcher alive."""
        return (
            not self._draining
            and self._worker_ready.is_set()
            and self._thread.is_alive()
            and self._proc is not None
            and self._proc.is_alive()
        )

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def drain(self) -> None:
        """Refuse new fits and cancel every queued and running job."""
        with self._cond:
            self._draining = True
            pending, self._queue = list(self._queue), deque()
            if self._current is not None:
                self._cancel.set()
        for p in pending:
            self._end_quietly(p.job_id, JobStatus.cancelled)
            self._ended(self._store.get_job(p.job_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Drain, wait for the running fit to stop, then end the worker."""
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._stop_worker(timeout)

    # -- requests --------------------------------------------------------------------------

    def submit(self, job: Job, x: bytes, y: bytes) -> None:
        """Queue a job, or raise QueueFull/ShuttingDown."""
        with self._cond:
            if self._draining:
                raise ShuttingDown("the service is shutting down; send the fit to another replica")
            if len(self._queue) >= self._settings.max_queued_jobs:
                raise QueueFull(
                    f"{len(self._queue)} jobs are queued (SGD_MAX_QUEUED_JOBS="
                    f"{self._settings.max_queued_jobs}); retry later or cancel one",
                    retry_after=2,
                )
            self._queue.append(_Pending(job.id, x, y))
            self._cond.notify_all()

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or ask the running one to stop after its current chunk."""
        with self._cond:
            job = self._store.get_job(job_id)
            if job.status.ended:
                raise JobAlreadyEnded(
                    f"job {job_id} already ended as {job.status.value}; nothing to cancel"
                )
            if job_id == self._current:
                self._cancel.set()
                return job
            self._queue = deque(p for p in self._queue if p.job_id != job_id)
        job = self._store.end_job(job_id, JobStatus.cancelled)
        self._ended(job)
        return job

    # -- the dispatcher thread -------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            if not self._worker_ready.is_set() and not self._await_worker():
                return
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                pending = self._queue.popleft()
                job = self._store.start_job(pending.job_id)
                if job is None:  # cancelled while queued
                    continue
                self._current = job.id
                self._cancel.clear()
            _log_job(job)
            try:
                self._run(job, pending)
            except WorkerCrashed as exc:
                log.error("job %s: %s", job.id, exc.detail)
                self._end_quietly(job.id, JobStatus.failed, exc.problem())
                if not self._stopping:
                    self._start_worker()
            except Exception:
                log.exception("job %s: dispatcher error", job.id)
                self._end_quietly(job.id, JobStatus.failed, WorkerCrashed("internal").problem())
            finally:
                with self._cond:
                    self._current = None
            self._ended(self._store.get_job(job.id))

    def _await_worker(self) -> bool:
        """Wait for the worker's hello (torch imported, engine warm); False if stopping."""
        assert self._chan is not None
        conn = self._chan.conn
        while not self._stopping:
            try:
                if conn.poll(POLL_SECONDS):
                    _, self.worker_info = conn.recv()
                    log.info("training worker ready: %s", self.worker_info)
                    self._worker_ready.set()
                    return True
            except (EOFError, OSError):
                pass
            if not self._proc.is_alive():
                log.error("training worker exited during start-up; restarting it")
                self._start_worker()
                assert self._chan is not None
                conn = self._chan.conn
        return False

    def _run(self, job: Job, pending: _Pending) -> None:
        chan = self._chan
        assert chan is not None
        conn = chan.conn
        try:
            conn.send(("fit", job.id, job.params.model_dump(), pending.x, pending.y))
            while True:
                while not conn.poll(POLL_SECONDS):
                    if not self._proc.is_alive():
                        raise WorkerCrashed(
                            f"the training worker exited with code {self._proc.exitcode}; "
                            "the job may have needed more memory than the host has"
                        )
                msg = conn.recv()
                if msg[0] == "chunk":
                    _, count, columns = msg
                    w, loss = chan.recv_floats(count), chan.recv_floats(count)
                    b = chan.recv_floats(count) if columns == 3 else None
                    self._store.append_history(job.id, w, b, loss)
                elif msg[0] == "done":
                    _, w, b, final_loss, mse = msg
                    self._store.succeed_job(job.id, w, b, final_loss, mse)
                    return
                else:
                    status = JobStatus.cancelled if msg[0] == "cancelled" else JobStatus.failed
                    self._store.end_job(job.id, status, msg[1])
                    return
        except (EOFError, OSError) as exc:
            raise WorkerCrashed(f"lost the training worker: {exc!r}") from exc

    def _end_quietly(
        self, job_id: str, status: JobStatus, problem: dict[str, Any] | None = None
    ) -> None:
        with contextlib.suppress(ServiceError):  # already ended or evicted: nothing left to do
            self._store.end_job(job_id, status, problem)

    def _ended(self, job: Job) -> None:
        _log_job(job)
        if self._on_end is not None:
            self._on_end(job)

    # -- the worker process ----------------------------------------------------------------

    def _start_worker(self) -> None:
        self._stop_worker(timeout=1.0)
        self._worker_ready.clear()
        parent, child = self._ctx.Pipe()
        s = self._settings
        self._proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self._cancel, s.torch_threads, s.worker_nice, s.worker_sched_idle),
            name="sgd-worker",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._chan = _Channel(parent)

    def _stop_worker(self, timeout: float) -> None:
        if self._proc is None:
            return
        if self._chan is not None:
            with contextlib.suppress(OSError, ValueError):
                self._chan.conn.send(None)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        if self._chan is not None:
            self._chan.close()
        self._proc = self._chan = None


def _log_job(job: Job) -> None:
    fields: dict[str, Any] = {"job_id": job.id, "status": job.status.value}
    fields.update(epoch=job.progress.epoch, epochs=job.progress.epochs, n_samples=job.n_samples)
    if job.error is not None:
        fields["error"] = job.error.type
    if job.result is not None:
        fields["model_version"] = job.result.model_version
    log.info("job %s", job.status.value, extra={"fields": fields})


def _worker_main(
    conn: Connection, cancel: Event, threads: int, nice: int, sched_idle: bool
) -> None:
    """Entry point of the worker process: run fits one at a time until told to stop."""
    started = time.perf_counter()
    if nice:
        os.nice(nice)
    policy = _lower_policy() if sched_idle else "other"
    import torch

    from service import training
    from service.errors import Diverged

    torch.set_num_threads(threads)
    # Plain types only: unpickling a TorchVersion made the server import torch.
    info = {"pid": os.getpid(), "torch": str(torch.__version__), "threads": threads, "nice": nice}
    info["policy"] = policy
    info.update(training.prepare())  # one-off engine set-up is paid here, once per process
    conn.send(("ready", {**info, "startup_seconds": round(time.perf_counter() - started, 3)}))
    chan = _Channel(conn)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg is None:
            # Skip interpreter teardown (torch's costs seconds): nothing is left to flush.
            chan.close()
            os._exit(0)
        _, _job_id, params, xb, yb = msg
        x, y = training.as_tensor(xb), training.as_tensor(yb)
        fit = training.FitParams(**params)
        outbox = _Outbox(chan, fit.fit_intercept)
        try:
            last = None
            for last in training.train(x, y, fit):
                outbox.add(last)
                if cancel.is_set():
                    outbox.flush()
                    conn.send(("cancelled", None))
                    break
            else:
                outbox.flush()
                assert last is not None
                w, b = last.w_after, last.b_after
                conn.send(("done", w, b, last.loss[-1], training.mse(x, y, w, b)))
        except Diverged as exc:
            outbox.flush()
            conn.send(("failed", exc.problem()))
        except Exception as exc:  # report, and stay alive for the next job
            outbox.flush()
            conn.send(("failed", WorkerCrashed(f"the fit raised {exc!r}").problem()))


def _lower_policy() -> str:
    """Put this process under SCHED_IDLE where the OS has it; the policy it runs under.

    Lowering one's own policy needs no privilege (not even CAP_SYS_NICE), so this works in a
    container with every capability dropped. The hello reports the policy; the server logs it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused by a sandbox: niceness only
        return "other"
    return "idle"


class _Outbox:
    """Coalesces history chunks into one message every FLUSH_SECONDS."""

    def __init__(self, chan: _Channel, with_b: bool) -> None:
        self._chan = chan
        self._with_b = with_b
        self._parts: list[Any] = []
        self._last = time.monotonic()

    def add(self, chunk: Any) -> None:
        self._parts.append(chunk)
        if time.monotonic() - self._last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            columns = [b"".join(c.w.tobytes() for c in self._parts)]
            columns.append(b"".join(c.loss.tobytes() for c in self._parts))
            if self._with_b:
                columns.append(b"".join(c.b.tobytes() for c in self._parts))
            self._chan.send_floats(columns)
            self._parts = []
        self._last = time.monotonic()
