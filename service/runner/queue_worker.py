"""`sgd-service worker`, and a replica's embedded workers: a training worker on the shared queue
(Redis mode).

Like the in-memory runner's worker it imports torch and prepares the engine once, then runs one
fit at a time at a lower CPU priority, through the same loop (service.runner.session). It takes
fits from the queue (service.runner.queue), writes their history straight into Redis every
FLUSH_SECONDS and publishes the result; every write carries the attempt number it claimed, so
once it has lost the job nothing it writes lands.

Between blocks of epochs it checks for a cancel, for the job's time limit, and for its own stop
(SIGTERM, Ctrl-C): a stopping worker gives its fit back to the queue, where another worker runs
it again, and exits. Killed outright it cannot: its beats stop, and after SGD_LEASE_SECONDS a
reconciler queues its fit again for another worker.
"""

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import redis

from service.core.errors import (
    Fenced,
    JobAlreadyEnded,
    JobNotFound,
    JobTimedOut,
    StoreUnavailable,
)
from service.core.logs import configure_logging, log_job
from service.core.processes import lower_priority, name_process
from service.core.schemas import Job
from service.core.settings import Settings
from service.runner.queue import HAND_BACK_SECONDS, make_broker, start_reconciler
from service.runner.worker import Hello
from service.state.base import WorkerStore
from service.state.redis import RedisStore
from service.state.redis_jobs import ACTOR, QUEUE

log = logging.getLogger("sgd_service.worker")
T = TypeVar("T")
# How long a stopping worker waits for an unavailable Redis to take its fit back; then it leaves
# the job to the reconciler.
REDIS_WAIT_ON_STOP_SECONDS = 5.0
# How often the main thread marks the worker healthy (with --health-file).
HEALTH_SECONDS = 2.0
# How often it looks for a stop, and for the replica that started it.
WATCH_SECONDS = 0.5


# Both are BaseExceptions, as asyncio's CancelledError is, so that no handler of a fit's errors
# takes them for one (service.runner.session lets them through): they leave the fit unreported.


class _Stopped(BaseException):
    """This worker is stopping: give the fit back to the queue."""


class _Lost(BaseException):
    """This attempt lost its job while it wrote its history (Fenced, or the job ended or went):
    drop it."""


class FitActor:
    """The body of the `fit` actor: one attempt at one job.

    Redis may go away at any moment (restarted, hung, cut off): the attempt then waits for it
    and goes on where it was, its history kept in memory meanwhile, rather than give its fit
    back. Only its beats (service.state.redis.Reconciler) say whether it still owns the job,
    and a write it can no longer make is refused (Fenced), never half made.
    """

    def __init__(self, store: WorkerStore, settings: Settings, broker: Any) -> None:
        self.store = store
        self.settings = settings
        self.broker = broker
        self.stopping = threading.Event()
        self.current: tuple[str, int] | None = None  # the job and attempt this worker runs

    def run(self, job_id: str) -> None:
        token = uuid.uuid4().hex  # the same for every try of this claim
        try:
            claim = self.store.claim
            job = self.stored(lambda: claim(job_id, self.broker.broker_id, token))
            if job is None:
                return  # ended, cancelled, or running elsewhere: a duplicate
            self.current = (job.id, job.attempts)
            log_job(job)
            self._run(job)
        except (Fenced, JobAlreadyEnded, JobNotFound, _Lost) as exc:
            log.warning("job %s: this attempt lost the job (%s); dropping it", job_id, exc)
        except _Stopped:
            if self.current is not None:
                self._hand_back(*self.current)
        finally:
            self.current = None

    def stored(self, write: Callable[[], T], grace: float = 0.0) -> T:
        """write()'s result once Redis takes it: tried again every half second while Redis is
        unavailable; raises _Stopped once this worker is stopping (after `grace` seconds)."""
        deadline: float | None = None
        warned = False
        while True:
            try:
                return write()
            except StoreUnavailable as exc:
                if not warned:
                    log.warning("Redis is unavailable (%s); waiting for it", exc)
                    warned = True
                if self.stopping.is_set():
                    deadline = deadline or time.monotonic() + grace
                    if time.monotonic() >= deadline:
                        raise _Stopped from exc
                self.stopping.wait(0.5)

    def _hand_back(self, job_id: str, attempt: int) -> None:
        """Put the job back on the queue, with a new message, for the next free worker. One
        that cannot reach Redis within a few seconds leaves it to the reconciler."""
        with contextlib.suppress(Fenced, JobAlreadyEnded, JobNotFound, _Stopped):
            self.stored(
                lambda: self.store.requeue_job(job_id, attempt), grace=REDIS_WAIT_ON_STOP_SECONDS
            )
            log.info("job %s handed back to the queue", job_id)

    def _run(self, job: Job) -> None:
        """Run the fit and publish how it ended, every write under this attempt's number."""
        from service.runner.session import run_session

        samples = self.stored(lambda: self.store.job_data(job.id))
        attempt = _Attempt(self, job)
        outcome = run_session(samples, job.params.model_dump(), attempt, attempt.interrupted)
        if outcome.crash is not None:
            log.error("job %s: the fit raised", job.id, exc_info=outcome.crash)
        n, report = job.attempts, outcome.report
        if report is not None:
            ended = self.stored(lambda: self.store.succeed_job(job.id, report, attempt=n))
        else:
            status, problem = outcome.status, outcome.problem
            ended = self.stored(lambda: self.store.end_job(job.id, status, problem, attempt=n))
        log_job(ended)


class _Attempt:
    """Where one attempt's fit writes and what interrupts it (session.Sink and interrupted):
    its history appended to Redis under its attempt number; a cancel, a stop, its time limit."""

    def __init__(self, actor: FitActor, job: Job) -> None:
        self._actor = actor
        self._job_id, self._attempt = job.id, job.attempts
        started = job.started_at or datetime.now(UTC)
        self._deadline = started.timestamp() + actor.settings.job_timeout
        self._recorded = 0  # epochs in Redis
        self._wrote = False  # since the last interrupted()

    def write(self, history: dict[str, bytes], final: bool) -> bool:
        """Appended now; or kept in memory while Redis is away (False) and, if final, waited
        for (_Stopped if this worker stops meanwhile)."""
        self._wrote = True
        if final:
            return self._actor.stored(lambda: self._append(history))
        try:
            return self._append(history)
        except StoreUnavailable:
            return False

    def _append(self, history: dict[str, bytes]) -> bool:
        cols = {name: memoryview(column).cast("d") for name, column in history.items()}
        try:
            self._actor.store.append_history(
                self._job_id,
                cols["w"],
                cols.get("b"),
                cols["loss"],
                val_loss=cols.get("val_loss"),
                attempt=self._attempt,
                at=self._recorded,
            )
        except (Fenced, JobAlreadyEnded, JobNotFound) as exc:
            raise _Lost(exc) from exc
        self._recorded += len(cols["w"])
        return True

    def interrupted(self) -> bool:
        """Whether the job was cancelled; raises _Stopped if this worker is stopping, and
        JobTimedOut past the job's time limit. Only after a write, once per FLUSH_SECONDS:
        the cancel is a Redis command, and a chunk can take a millisecond."""
        if not self._wrote:
            return False
        self._wrote = False
        try:
            if self._actor.store.cancel_requested(self._job_id):
                return True
        except StoreUnavailable:
            pass
        if self._actor.stopping.is_set():
            raise _Stopped
        if time.time() > self._deadline:
            raise JobTimedOut(self._actor.settings.job_timeout)
        return False


def _beat(actor: FitActor, stop: threading.Event) -> None:
    """Bump the running attempt's beat every lease/5 s: this worker owns its job."""
    while not stop.wait(actor.store.lease_seconds / 5):
        current = actor.current
        if current is not None:
            with contextlib.suppress(StoreUnavailable):
                actor.store.beat(*current)


def _touch_if_reachable(store: RedisStore, health_file: Path) -> None:
    """Mark this worker healthy for a container's healthcheck: alive, and Redis answers."""
    try:
        store.redis.ping()
    except redis.RedisError:
        return
    with contextlib.suppress(OSError):
        health_file.touch()


def embedded(replica: Connection, settings: Settings) -> None:
    """A replica's own worker (SGD_WORKERS), forked from its fork server (service.runner.fleet)."""
    name_process("sgd-worker")
    configure_logging(settings.log_level)
    main(settings, replica)


def main(
    settings: Settings, replica: Connection | None = None, health_file: Path | None = None
) -> None:
    """Run one training worker until SIGTERM or Ctrl-C; a second signal exits at once."""
    import dramatiq
    import torch

    stop = threading.Event()

    def on_signal(sig: int, frame: object) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.redis_url is None:
        raise SystemExit("sgd-service worker needs SGD_REDIS_URL: the queue of fits is in Redis")
    started = time.perf_counter()
    torch.set_num_threads(settings.torch_threads)
    info: dict[str, Any] = {"pid": os.getpid(), "torch": str(torch.__version__)}
    store = RedisStore.from_settings(settings, watch=False)
    with contextlib.suppress(redis.RedisError):  # Redis away: the replicas warn too
        store.check_config()
    broker = make_broker(settings, store)
    actor = FitActor(store, settings, broker)
    # The beats and the reconciler keep the normal priority: a worker starved of CPU under
    # SCHED_IDLE must not look dead for it, and their work is a few commands a second.
    keepers = threading.Event()
    beats = threading.Thread(target=_beat, args=(actor, keepers), name="sgd-beat", daemon=True)
    beats.start()
    start_reconciler(store, settings, keepers)
    spared = {t.native_id for t in threading.enumerate() if t.name in ("sgd-beat", "sgd-reconcile")}
    info["policy"] = lower_priority(
        settings.worker_nice, settings.worker_sched_idle, spare={t for t in spared if t}
    )
    dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, broker=broker)(actor.run)
    worker = dramatiq.Worker(broker, queues={QUEUE}, worker_threads=1, worker_timeout=100)
    worker.queue_prefetch = (
        1  # never hold a second fit while this one runs: another worker may be free
    )
    worker.start()
    info["worker_id"] = broker.broker_id
    info["startup_seconds"] = round(time.perf_counter() - started, 3)
    log.info("training worker ready", extra={"fields": info})
    # An embedded worker (its replica waits for its hello on the pipe between them) lives and dies
    # with its replica: killed outright, the replica cannot stop it, so it watches for that. The
    # replica sends nothing more, so anything to read is the end of the pipe: the replica is gone.
    # (Not a change of parent: the worker's is the fork server, which outlives the replica.)
    if replica is not None:
        with contextlib.suppress(OSError):  # gone already: seen just below
            replica.send(Hello(info))
    next_health = 0.0
    while not stop.wait(WATCH_SECONDS):
        if replica is not None and replica.poll(0):
            log.warning("the replica that started this worker is gone; stopping")
            break
        if health_file is not None and time.monotonic() >= next_health:
            _touch_if_reachable(store, health_file)
            next_health = time.monotonic() + HEALTH_SECONDS
    log.info("training worker stopping: handing its fit back to the queue")
    actor.stopping.set()
    worker.stop(timeout=int(HAND_BACK_SECONDS * 1000))
    os._exit(0)  # skip torch's slow interpreter teardown: nothing is left to flush
