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

import logging
import threading
import uuid
from typing import Any

from service.core.errors import NotReady, ServiceError, StoreUnavailable
from service.core.processes import fork_context
from service.core.schemas import Job, JobParams
from service.core.settings import Settings
from service.runner import queue_worker, supervisor
from service.runner.base import draining, shutting_down, starting
from service.runner.queue import HAND_BACK_SECONDS, start_reconciler
from service.runner.supervisor import StartFailed, StartFailures, WorkerProcess
from service.runner.worker import Samples
from service.state.redis import RedisStore

log = logging.getLogger("sgd_service.fleet")


class QueueRunner:
    """The runner of a replica in Redis mode: submit and cancel through the shared store and
    queue, readiness from the store, and the embedded training workers."""

    def __init__(self, store: RedisStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._draining = False
        self._stopping = threading.Event()
        self._ctx = fork_context()
        self._workers: list[WorkerProcess | None] = [None] * settings.workers
        self._ready: set[int] = set()  # indexes of the workers that said hello
        self._starts = StartFailures()
        self._watcher = threading.Thread(target=self._supervise, name="sgd-workers", daemon=True)
        self.worker_info: dict[str, Any] = {}

    def start(self) -> None:
        start_reconciler(self._store, self._settings, self._stopping)
        if self._settings.workers:
            self._watcher.start()

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
            return draining()
        if self._store.problem is not None:
            return StoreUnavailable(
                f"{self._store.problem}; this replica still serves predictions from memory"
            )
        if not self._store.loaded:
            return NotReady("the served model is being read from Redis; retry shortly")
        return starting()

    @property
    def broken(self) -> str | None:
        """Set when the embedded workers cannot start at all; a lost Redis heals by itself."""
        return self._starts.broken

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
            raise shutting_down()
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
        if self._watcher.ident is not None:
            self._watcher.join(timeout + 5)
        self._store.close()

    # -- the embedded workers --------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        """Start worker i, forked from the fork server as the in-memory runner's worker is. It
        says hello on its pipe once it can take fits, and stops when the pipe closes: when this
        replica is gone, even killed with -9."""
        try:
            new = WorkerProcess(
                self._ctx, queue_worker.embedded, (self._settings,), f"sgd-worker-{i}"
            )
        except StartFailed as exc:
            self._starts.failed(str(exc))
            return
        self._workers[i] = new
        self.worker_info[f"worker{i}"] = new.pid

    def _check_ready(self) -> None:
        for i, w in enumerate(self._workers):
            if i in self._ready or w is None or not w.conn.poll(0):
                continue
            if w.hello() is not None:  # else it died before it: _lost counts the failed start
                self._ready.add(i)
                self._starts.succeeded()

    def _lost(self, i: int) -> None:
        """Worker i died, or could not be started: forget it; a death before its hello is a
        failed start (one that could not be started was counted as it failed)."""
        gone, self._workers[i] = self._workers[i], None
        if gone is None:
            return
        code = gone.exit_code(0)
        gone.close()
        if i in self._ready:
            self._ready.discard(i)
            log.warning("training worker %d exited with %s; restarting", gone.pid, code)
        else:
            self._starts.failed(f"training worker {gone.pid} exited with code {code}")

    def _supervise(self) -> None:
        """Keep SGD_WORKERS workers alive until stop(); then stop them (SIGTERM: each hands its
        fit back)."""
        for i in range(len(self._workers)):
            self._spawn(i)
        while not self._stopping.is_set():
            self._check_ready()
            for i, w in enumerate(self._workers):
                if w is not None and w.proc.is_alive():
                    continue
                self._lost(i)
                if self._stopping.wait(self._starts.backoff()):
                    break
                self._spawn(i)
            self._stopping.wait(0.1)
        supervisor.stop([w for w in self._workers if w is not None], HAND_BACK_SECONDS)
