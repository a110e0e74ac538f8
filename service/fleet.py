"""Fits on a shared queue (Redis mode): any replica enqueues, any training worker runs.

The queue, the delivery to one worker at a time, the heartbeats and the redelivery of a dead
worker's job are Dramatiq's (its Redis broker): a worker acknowledges a fit's message only once
the fit has ended, and a worker whose heartbeat is older than SGD_LEASE_SECONDS is dead to the
others, which put its unacknowledged messages back on the queue. What Dramatiq does not know,
who owns a job now, is the store's: each run claims the job (its attempt number is the fencing
token, see service.redis_store), so a run that lost its job can never write again.

QueueRunner is the API side: the JobRunner interface on the queue, plus the SGD_WORKERS
training workers it starts beside the API and restarts. They run what `sgd-service worker`
runs (service.queue_worker), forked from the fork server the in-memory runner's worker comes
from: ready in a fraction of a second, at the start and after every crash, not an interpreter
importing torch for a second and more.
"""

import contextlib
import logging
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from service.errors import NotReady, QueueFull, ServiceError, ShuttingDown, StoreUnavailable
from service.redis_store import RedisStore
from service.schemas import Job, JobStatus
from service.settings import Settings
from service.worker import Samples, fork_context

log = logging.getLogger("sgd_service.fleet")

QUEUE = "fits"
ACTOR = "fit"
# Workers that die this many times in a row before they are ready cannot start at all.
MAX_START_FAILURES = 5
# A crash-looping worker is restarted no faster than this.
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 4.0)
# How long `stop` waits for a worker to hand its fit back before it is killed.
WORKER_STOP_SECONDS = 20.0


def make_broker(settings: Settings, store: RedisStore) -> Any:
    """Dramatiq's Redis broker in the store's namespace: no middleware (retries, time limits and
    cancels are the service's own, per attempt), heartbeats every fetch, a lease of
    SGD_LEASE_SECONDS, and queue maintenance (the redelivery of dead workers' messages) on every
    fetch rather than one in a thousand: a dead worker's fit is back on the queue at once."""
    from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

    return RedisBroker(  # type: ignore[no-untyped-call]
        client=store.redis,
        namespace=store.queue_namespace,
        middleware=[],
        heartbeat_timeout=int(settings.lease_seconds * 1000),
        maintenance_chance=MAINTENANCE_SCALE,
    )


def enqueue(broker: Any, job_id: str) -> None:
    from dramatiq import Message

    broker.enqueue(
        Message(queue_name=QUEUE, actor_name=ACTOR, args=(job_id,), kwargs={}, options={})
    )


class QueueRunner:
    """The runner of a replica in Redis mode: submit and cancel through the shared store and
    queue, readiness from the store, and the embedded training workers."""

    def __init__(self, store: RedisStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._broker = make_broker(settings, store)
        self._draining = False
        self._stopping = threading.Event()
        self._ctx = fork_context()
        self._procs: list[BaseProcess | None] = [None] * settings.workers
        self._conns: list[Connection | None] = [None] * settings.workers  # open while it lives
        self._ready: set[int] = set()  # indexes of the workers that said they are ready
        self._start_failures = 0  # deaths before readiness, in a row
        self._broken: str | None = None
        self._supervisor = threading.Thread(target=self._supervise, name="sgd-workers", daemon=True)
        self.worker_info: dict[str, Any] = {}

    def start(self) -> None:
        if self._settings.workers:
            self._supervisor.start()

    @property
    def ready(self) -> bool:
        """Redis answers, the served model has been read, and an embedded worker is warm (if
        this replica runs any: with SGD_WORKERS=0 the fits wait for standalone workers)."""
        workers_ok = not self._settings.workers or bool(self._ready)
        return not self._draining and self._store.reachable and self._store.loaded and workers_ok

    def not_ready(self) -> ServiceError:
        if self._draining:
            return NotReady("the service is shutting down; send requests to another replica")
        if not self._store.reachable:
            return StoreUnavailable(
                "Redis cannot be reached; this replica still serves predictions from memory"
            )
        if not self._store.loaded:
            return NotReady("the served model is being read from Redis; retry shortly")
        return NotReady("no training worker of this replica is ready yet; retry shortly")

    @property
    def broken(self) -> str | None:
        """Set when the embedded workers cannot start at all; a lost Redis heals by itself."""
        return self._broken

    @property
    def queue_depth(self) -> int:
        try:
            return self._store.job_counts().get(JobStatus.queued, 0)
        except Exception:
            return 0

    def submit(self, job: Job, x: Samples, y: Samples) -> None:
        """Queue a job for whichever worker is free, or raise QueueFull/ShuttingDown."""
        if self._draining:
            raise ShuttingDown("the service is shutting down; send the fit to another replica")
        queued = self._store.job_counts().get(JobStatus.queued, 0) - 1  # less this new one
        limit = self._settings.max_queued_jobs
        if queued >= limit:
            raise QueueFull(
                f"{queued} jobs are queued (SGD_MAX_QUEUED_JOBS={limit}); retry later or "
                "cancel one",
                retry_after=2,
            )
        self._store.put_data(job.id, b"".join(x), b"".join(y))
        enqueue(self._broker, job.id)

    def cancel(self, job_id: str) -> Job:
        return self._store.request_cancel(job_id)

    def drain(self) -> None:
        """Refuse new fits. Queued and running jobs stay: other replicas and workers run them."""
        self._draining = True

    def stop(self, timeout: float = WORKER_STOP_SECONDS) -> None:
        """Stop the embedded workers; each hands its running fit back to the queue."""
        self.drain()
        self._stopping.set()
        if self._supervisor.ident is not None:
            self._supervisor.join(timeout + 5)
        self._store.close()

    # -- the embedded workers --------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        """Start worker i, forked from the fork server (service.worker.fork_context) as the
        in-memory runner's worker is. It sends a byte on its pipe once it can take fits, and
        stops when the pipe closes: when this replica is gone, even killed with -9."""
        from service import queue_worker

        conn, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=queue_worker.embedded,
            args=(self._settings, child),
            name=f"sgd-worker-{i}",
            daemon=True,
        )
        try:
            proc.start()
        except (OSError, EOFError) as exc:  # the fork server died, or could not start
            log.warning("training worker %d could not be started: %r", i, exc)
            conn.close()
            return
        finally:
            child.close()
        self._procs[i] = proc
        self._conns[i] = conn
        self.worker_info[f"worker{i}"] = proc.pid

    def _check_ready(self) -> None:
        for i, conn in enumerate(self._conns):
            if i in self._ready or conn is None or not conn.poll(0):
                continue
            with contextlib.suppress(EOFError, OSError):  # it died before its hello
                conn.recv_bytes()
                self._ready.add(i)
                self._start_failures = 0

    def _lost(self, i: int) -> None:
        """Worker i died, or could not be started: forget it, and count it if it never was ready."""
        proc = self._procs[i]
        if proc is not None:
            log.warning("training worker %d exited with %s; restarting", proc.pid, proc.exitcode)
            proc.close()
            self._procs[i] = None
        if i not in self._ready:
            self._start_failures += 1
        self._ready.discard(i)
        conn, self._conns[i] = self._conns[i], None
        if conn is not None:
            conn.close()
        if self._start_failures >= MAX_START_FAILURES:
            self._broken = (
                f"training workers died {self._start_failures} times before they were ready"
            )

    def _supervise(self) -> None:
        """Keep SGD_WORKERS workers alive until stop(); then stop them."""
        for i in range(len(self._procs)):
            self._spawn(i)
        while not self._stopping.is_set():
            self._check_ready()
            for i, proc in enumerate(self._procs):
                if proc is not None and proc.is_alive():
                    continue
                self._lost(i)
                backoff = RESTART_BACKOFF[min(self._start_failures, len(RESTART_BACKOFF) - 1)]
                if self._stopping.wait(backoff):
                    break
                self._spawn(i)
            self._stopping.wait(0.1)
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("training worker %d did not stop; killing it", proc.pid)
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.join(5)
        for conn in self._conns:
            if conn is not None:
                conn.close()
