"""The runner of a replica in Redis mode: fits on a shared queue, which any replica feeds and
any training worker empties.

The queue and the delivery to one worker at a time are Dramatiq's (its Redis broker,
service.runner.queue): a worker acknowledges a fit's message only once the fit has ended. A
fit's job, key, samples and message are written in one transaction (service.state.redis), so a
202 always has a message behind it. Who owns a job now is the store's: each run claims the job
(its attempt number is the fencing token), beats while it runs, and every replica and worker
runs a Reconciler that queues a job again once its owner's beat stood still for
SGD_LEASE_SECONDS. Dramatiq's own redelivery of a worker it thinks dead is only a duplicate,
which the claim drops.

QueueRunner is the Runner protocol (service.runner.base) on that queue, plus the SGD_WORKERS
training workers it starts beside the API and restarts. They run what `sgd-service worker`
runs (service.runner.queue_worker), forked from the fork server the in-memory runner's worker
comes from: ready in a fraction of a second, at the start and after every crash, not an
interpreter importing torch for a second and more.
"""

import contextlib
import logging
import threading
import time
import uuid
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from service.core.errors import NotReady, ServiceError, ShuttingDown, StoreUnavailable
from service.core.processes import fork_context
from service.core.schemas import Job, JobParams
from service.core.settings import Settings
from service.runner import queue_worker
from service.runner.queue import HAND_BACK_SECONDS, start_reconciler
from service.runner.worker import Samples
from service.state.redis import RedisStore

log = logging.getLogger("sgd_service.fleet")

# Workers that die this many times in a row before they are ready cannot start at all.
MAX_START_FAILURES = 5
# A crash-looping worker is restarted no faster than this.
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 4.0)


class QueueRunner:
    """The runner of a replica in Redis mode: submit and cancel through the shared store and
    queue, readiness from the store, and the embedded training workers."""

    def __init__(self, store: RedisStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
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
        start_reconciler(self._store, self._settings, self._stopping)
        if self._settings.workers:
            self._supervisor.start()

    @property
    def ready(self) -> bool:
        """Redis answers and takes writes, the served model has been read, and an embedded
        worker is warm (if this replica runs any: with SGD_WORKERS=0 the fits wait for
        standalone workers)."""
        workers_ok = not self._settings.workers or bool(self._ready)
        store_ok = self._store.problem is None and self._store.loaded
        return not self._draining and store_ok and workers_ok

    def not_ready(self) -> ServiceError:
        if self._draining:
            return NotReady("the service is shutting down; send requests to another replica")
        if self._store.problem is not None:
            return StoreUnavailable(
                f"{self._store.problem}; this replica still serves predictions from memory"
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
            return self._store.queued_count()
        except StoreUnavailable:
            return 0

    def submit(
        self,
        params: JobParams,
        n_samples: int,
        x: Samples,
        y: Samples,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Create the job, its samples and its message in one transaction (or find the key's
        original); QueueFull and ShuttingDown create nothing."""
        if self._draining:
            raise ShuttingDown("the service is shutting down; send the fit to another replica")
        return self._store.create_job(
            params,
            n_samples,
            idempotency,
            max_queued=self._settings.max_queued_jobs,
            samples=(b"".join(x), b"".join(y)),
        )

    def cancel(self, job_id: str) -> Job:
        return self._store.request_cancel(job_id, token=uuid.uuid4().hex)

    def drain(self) -> None:
        """Refuse new fits. Queued and running jobs stay: other replicas and workers run them."""
        self._draining = True

    def stop(self, timeout: float = HAND_BACK_SECONDS) -> None:
        """Stop the embedded workers; each hands its running fit back to the queue."""
        self.drain()
        self._stopping.set()
        if self._supervisor.ident is not None:
            self._supervisor.join(timeout + 5)
        self._store.close()

    # -- the embedded workers --------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        """Start worker i, forked from the fork server (service.core.processes.fork_context) as the
        in-memory runner's worker is. It sends a byte on its pipe once it can take fits, and
        stops when the pipe closes: when this replica is gone, even killed with -9."""
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
        deadline = time.monotonic() + HAND_BACK_SECONDS
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
