"""RedisStore: the Store on Redis, shared by every replica and training worker (SGD_REDIS_URL).

What lives where (every key under SGD_REDIS_PREFIX, `sgd:` by default):

    job:{id}          hash: doc (the Job as JSON); while it runs: worker, attempt, claim (the
                      claim's token); cancel ("1" once asked), cancelled_by (the request's
                      token), idem (its Idempotency-Key), msg (its current message), deaths
    data:{id}         hash: x, y (float64 bytes) until the job ends
    hist:{id}:{col}   string: the w, loss (and b) columns as raw float64, appended per chunk
    beat:{id}:{n}     a counter the owner of attempt n bumps every lease/5 s: its liveness
    jobs / ended      sorted sets: ids by creation / by end (list, eviction)
    queued / running  sorted sets: the open jobs by state (the queue's limit, the reconciler)
    idem:{key}        "<fingerprint> <job id>"
    models / versions hash: version -> Model JSON; sorted set: the kept versions (eviction)
    version           the last version number given out
    served            the served Model as JSON
    latest            the latest started job's id
    settings          hash: keep_jobs, keep_versions: retention, one setting of the service
    queue:fits[.msgs] the job library's queue (Dramatiq's Redis layout): message ids, bodies

Channels are server-wide in Redis, so theirs carry the database too: `{prefix}db{n}:served`
announces each change of the served model, `{prefix}db{n}:ended` each job's end, and
`{prefix}db{n}:changed` the id of each job written (its event streams read it then).

Every change of a job is a WATCH/MULTI transaction on its hash, so two processes never overwrite
each other's change, and each is safe to run twice: redis-py sends a command again after a cut
connection, when the first one may have landed, and the transaction then reads what it did
(a job that exists, a claim or cancel with its own token, history up to its own epoch). A fit is
created with its key, its samples and its queue message in one transaction: a job exists whole,
with a message, or not at all. A worker's writes carry its attempt number (the job's `attempts`
when it claimed the job): a worker that lost its job has a stale number, and the transaction
refuses it (Fenced) before anything lands.

Who owns a running job is decided by beats, not clocks: the owner bumps a counter, and the
Reconciler of every replica and worker, which watches the counters with its own monotonic clock,
calls an owner dead once its counter has stood still for a whole lease of unbroken watching. A
delivery of a running job's message is a duplicate, never a death (see claim). The same
reconciler puts a message back for a queued job whose message is no longer queued.

The served model is also held in memory, as in MemoryStore: `model` is one attribute read, kept
fresh by a thread that listens on the `served` channel and re-reads `served` every
RECHECK_SECONDS in case a message was missed. /predict never waits for Redis.
"""

import contextlib
import logging
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.core.errors import (
    Fenced,
    JobNotFound,
    ServiceError,
    StoreUnavailable,
    WorkerCrashed,
)
from service.core.schemas import (
    FitReport,
    History,
    Job,
    JobParams,
    JobStatus,
    Model,
)
from service.core.settings import Settings
from service.state import jobs
from service.state.base import Column, HistoryPage, Page, floats
from service.state.changes import Changes

log = logging.getLogger("sgd_service.redis")

# The job library's queue and actor (service.fleet, service.queue_worker): its keys are written
# here, with the job, so that a fit and its message exist together.
QUEUE = "fits"
ACTOR = "fit"
# How often the served model is re-read even without a message (a missed publication), and
# how often a replica checks that Redis takes writes (/readyz).
RECHECK_SECONDS = 0.5
PROBE_SECONDS = 1.0
# Socket timeouts: a Redis that does not answer is unavailable soon, not after minutes.
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 5.0
# A cut connection is dialled again at once, twice (every transaction here is safe to run
# again); a Redis that hangs is not asked again: its timeout is already the caller's wait.
RETRY = Retry(ExponentialBackoff(cap=0.2, base=0.02), 2, supported_errors=(redis.ConnectionError,))
# Above this many epochs between two picks, a thinned page reads each pick with its own
# GETRANGE (pipelined) instead of the whole range.
PICK_READ_STRIDE = 64
# A beat counter goes with its attempt's end; its TTL only collects what a crash left behind, it
# never decides liveness.
BEAT_TTL_MS = 600_000

T = TypeVar("T")
Pipeline = Any  # redis.client.Pipeline, as loosely typed as the client


def unavailable(exc: redis.RedisError) -> StoreUnavailable:
    """What every Redis failure is to a caller: a lost connection, a timeout, a refused write
    (OOM under maxmemory, MISCONF, READONLY) alike."""
    if isinstance(exc, redis.ResponseError):
        what = f"refuses the command: {str(exc).splitlines()[0][:200]}"
    else:
        what = f"cannot be reached: {exc.__class__.__name__}"
    return StoreUnavailable(
        f"the shared store (Redis) {what}; retry shortly (predictions still work)"
    )


def _available(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn any Redis error into StoreUnavailable (503 store-unavailable)."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class RedisStore:
    """The Store protocol on Redis, plus what training workers need: claim, beats, fenced
    writes, hand-backs, and the reconciler's two repairs."""

    def __init__(
        self,
        url: str,
        prefix: str,
        keep_jobs: int,
        keep_versions: int = 100,
        lease_seconds: float = 10.0,
        watch: bool = True,
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.queue_namespace = prefix + "queue"  # the job library's keys (service.fleet)
        self._keep_jobs = keep_jobs
        self._keep_versions = keep_versions
        self.lease_seconds = lease_seconds
        # Any: redis-py types every reply as bytes | str (for decode_responses) and leaves some
        # commands untyped; this client always answers bytes.
        self.redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=10,
            retry=RETRY,
        )
        db = self.redis.connection_pool.connection_kwargs.get("db", 0)
        self._channels = f"{prefix}db{db}:"
        self._on_end = on_end
        self._model: Model | None = None
        self._caught_up = 0  # the highest published version _catch_up has read the model for
        self.loaded = False  # the served model has been read once: the replica can be ready
        # Why Redis cannot take work now (unreachable, or refusing writes); None when it can.
        self.problem: str | None = "Redis has not answered yet"
        self._closed = threading.Event()
        self.changes = Changes()  # told by the watcher, from the `changed` channel
        self._watcher: threading.Thread | None = None
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="sgd-served", daemon=True)
            self._watcher.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, watch: bool = True, on_end: Callable[[Job], None] | None = None
    ) -> "RedisStore":
        """The store SGD_REDIS_URL and its companions describe."""
        assert settings.redis_url is not None
        return cls(
            settings.redis_url.get_secret_value(),
            settings.redis_prefix,
            settings.keep_jobs,
            keep_versions=settings.keep_versions,
            lease_seconds=settings.lease_seconds,
            watch=watch,
            on_end=on_end,
        )

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self.redis.close()

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _queue_key(self, suffix: str = "") -> str:
        return f"{self.queue_namespace}:{QUEUE}{suffix}"

    # -- the served model ------------------------------------------------------------------

    @property
    def model(self) -> Model | None:
        """The served model as this replica last saw it: one attribute read, never Redis."""
        return self._model

    @property
    def unreachable(self) -> str | None:
        """Why this replica may not know the served model (it has never read it), or None."""
        return None if self.loaded else self.problem

    def _adopt(self, raw: bytes | None) -> None:
        model = None if raw is None else Model.model_validate_json(raw)
        current = self._model
        if model is not None and (current is None or current.version != model.version):
            self._model = model  # the one assignment that serves it here
            log.info("serving model version %d", model.version)

    def refresh(self) -> None:
        """Read the served model now (the watcher does this by itself)."""
        self._adopt(self.redis.get(self._key("served")))
        self.loaded = True

    def _watch(self) -> None:
        """Keep `model` fresh: a message per publication, a re-read as the fallback; and keep
        `problem` true: Redis answers and takes writes."""
        announced = False
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*(self._channels + c for c in ("served", "ended", "changed")))
                self.changes.changed()  # what changed unheard meanwhile is read again
                self.refresh()
                if not announced:
                    self.check_config()
                    self._share_retention()
                    announced = True
                self._probe()
                last = probed = time.monotonic()
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=RECHECK_SECONDS / 2)
                    channel = b"" if msg is None else msg["channel"]
                    if channel.endswith(b":changed"):
                        self.changes.changed(msg["data"].decode())
                    elif channel.endswith(b":ended"):
                        self._ended(msg["data"])
                    if channel.endswith(b":served") or time.monotonic() - last >= RECHECK_SECONDS:
                        self.refresh()
                        last = time.monotonic()
                    if time.monotonic() - probed >= PROBE_SECONDS:
                        self._probe()
                        probed = time.monotonic()
            except redis.RedisError as exc:
                if self.problem is None:
                    log.warning("Redis unreachable (%s); serving the model in memory", exc)
                self.problem = f"Redis cannot be reached ({exc.__class__.__name__})"
                self._closed.wait(0.2)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _probe(self) -> None:
        """Write a short-lived key: a Redis out of memory, read-only or unable to persist
        refuses it, and the replica is not ready until it takes writes again."""
        try:
            self.redis.set(self._key("probe"), b"1", px=10_000)
        except redis.ResponseError as exc:
            problem = f"Redis refuses writes: {str(exc).splitlines()[0][:200]}"
            if self.problem != problem:
                log.warning("%s", problem)
            self.problem = problem
            return
        if self.problem is not None:
            log.info("Redis takes writes")
        self.problem = None

    def check_config(self) -> None:
        """Warn of a Redis that may evict keys: the service needs every one it writes (a lost
        version counter would give a number out twice)."""
        try:
            reply = self.redis.config_get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG is renamed or refused on some managed Redis
            log.info("cannot read Redis's maxmemory-policy; it must be noeviction (README)")
            return
        policy = reply.get(b"maxmemory-policy", reply.get("maxmemory-policy", b""))
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy != "noeviction":
            log.warning(
                "Redis runs with maxmemory-policy %s, which may evict the service's keys "
                "(jobs, versions, the version counter): set it to noeviction (README)",
                policy,
            )

    def _share_retention(self) -> None:
        """Make this replica's SGD_KEEP_JOBS and SGD_KEEP_VERSIONS the service's: every
        process evicts by what is in Redis, not by its own environment."""
        ours = {b"keep_jobs": str(self._keep_jobs).encode()}
        ours[b"keep_versions"] = str(self._keep_versions).encode()
        theirs = self.redis.hgetall(self._key("settings"))
        changed = {k.decode(): v.decode() for k, v in theirs.items() if ours.get(k, v) != v}
        if changed:
            log.warning(
                "this replica's retention replaces the service's: %s",
                ", ".join(f"{k} {v} -> {ours[k.encode()].decode()}" for k, v in changed.items()),
            )
        self.redis.hset(self._key("settings"), mapping=ours)

    def _retention(self) -> tuple[int, int]:
        """keep_jobs, keep_versions: the service's (set by its replicas), else this process's."""
        jobs, versions = self.redis.hmget(self._key("settings"), ["keep_jobs", "keep_versions"])
        return (
            int(jobs) if jobs else self._keep_jobs,
            int(versions) if versions else self._keep_versions,
        )

    def _ended(self, raw: bytes) -> None:
        """A job ended, on whichever worker: every replica reports it (metrics, the log)."""
        if self._on_end is None:
            return
        try:
            self._on_end(Job.model_validate_json(raw))
        except Exception:
            log.exception("reporting a job's end failed")

    # -- jobs: what the API needs ----------------------------------------------------------

    @_available
    def create_job(
        self,
        params: JobParams,
        n_samples: int,
        idempotency: tuple[str, str] | None = None,
        max_queued: int | None = None,
        samples: tuple[bytes, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job and True, or the Idempotency-Key's original and False; with
        `samples`, the job's data and its queue message too: all of it in one transaction.
        A full queue (max_queued) raises QueueFull having written nothing, so a refusal never
        takes away a job that another request was handed."""
        job = jobs.new_job(params, n_samples, jobs.now())
        key, queued_key = self._key("job", job.id), self._key("queued")
        idem_key = None if idempotency is None else self._key("idem", idempotency[0])
        watched = [key, queued_key] + ([idem_key] if idem_key else [])
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    mine = pipe.hget(key, "doc")
                    if mine is not None:  # this very call ran before its answer was lost
                        return Job.model_validate_json(mine), True
                    if idempotency is not None and idem_key is not None:
                        original = self._original(pipe, idem_key, idempotency)
                        if original is not None:
                            return original, False
                    if max_queued is not None:
                        queued = int(pipe.zcard(queued_key))
                        if queued >= max_queued:
                            raise jobs.queue_full(queued, max_queued)
                    pipe.multi()
                    fields = {"doc": job.model_dump_json()}
                    if idempotency is not None:
                        fields["idem"] = idempotency[0]
                        pipe.set(idem_key, f"{idempotency[1]} {job.id}")
                    pipe.hset(key, mapping=fields)
                    pipe.zadd(self._key("jobs"), {job.id: time.time()})
                    pipe.zadd(queued_key, {job.id: time.time()})
                    if samples is not None:
                        x, y = samples
                        pipe.hset(self._key("data", job.id), mapping={"x": x, "y": y})
                        self._enqueue(pipe, job.id)
                    pipe.execute()
                    return job, True
                except redis.WatchError:
                    pipe.reset()

    def _original(self, pipe: Pipeline, idem_key: str, idempotency: tuple[str, str]) -> Job | None:
        """The job an Idempotency-Key already names, or None if it names none (never used, or
        its job was evicted: the key is free again); IdempotencyKeyReused for another body."""
        seen = pipe.get(idem_key)
        if seen is None:
            return None
        fingerprint, job_id = seen.decode().split(" ", 1)
        doc = pipe.hget(self._key("job", job_id), "doc")
        if doc is None:
            return None
        if fingerprint != idempotency[1]:
            raise jobs.key_reused(idempotency[0])
        return Job.model_validate_json(doc)

    def _enqueue(self, pipe: Pipeline, job_id: str) -> None:
        """Queue a message for the job (in the transaction being built), as Dramatiq's Redis
        broker does, and note it on the job: its id, for the reconciler."""
        from dramatiq import Message

        message_id = str(uuid.uuid4())
        body = Message(
            queue_name=QUEUE,
            actor_name=ACTOR,
            args=(job_id,),
            kwargs={},
            options={"redis_message_id": message_id},
        ).encode()
        pipe.hset(self._queue_key(".msgs"), message_id, body)
        pipe.rpush(self._queue_key(), message_id)
        pipe.hset(self._key("job", job_id), "msg", message_id)

    @_available
    def job_data(self, job_id: str) -> tuple[bytes, bytes]:
        x, y = self.redis.hmget(self._key("data", job_id), ["x", "y"])
        if x is None or y is None:
            raise JobNotFound(f"no data for job {job_id!r}")
        return x, y

    @_available
    def get_job(self, job_id: str) -> Job:
        doc = self.redis.hget(self._key("job", job_id), "doc")
        if doc is None:
            raise jobs.job_not_found(job_id)
        return self._present([doc])[0]

    @_available
    def list_jobs(self, limit: int) -> list[Job]:
        ids = self.redis.zrevrange(self._key("jobs"), 0, limit - 1)
        return self._jobs([i.decode() for i in ids])

    @_available
    def job_counts(self) -> dict[JobStatus, int]:
        ids = self.redis.zrange(self._key("jobs"), 0, -1)
        return Counter(j.status for j in self._jobs([i.decode() for i in ids]))

    @_available
    def queued_count(self) -> int:
        return int(self.redis.zcard(self._key("queued")))

    def _jobs(self, ids: list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self._key("job", job_id), "doc")
        return self._present([d for d in pipe.execute() if d is not None])  # evicted meanwhile

    def _present(self, docs: list[bytes]) -> list[Job]:
        jobs = [Job.model_validate_json(doc) for doc in docs]
        self._catch_up(jobs)
        return jobs

    def _catch_up(self, jobs: list[Job]) -> None:
        """Read your writes: a caller shown a job that published version N gets N (or a later
        served version) from this replica's /predict from then on, not only within the
        subscription's milliseconds. One read of the served model, once per such version."""
        published = max((j.result.model_version for j in jobs if j.result), default=0)
        current = self._model.version if self._model else 0
        if published > current and published > self._caught_up:
            self._caught_up = published
            self.refresh()

    # -- jobs: what workers need -----------------------------------------------------------

    def _change(
        self,
        job_id: str,
        fn: Callable[[Pipeline, Job, dict[bytes, bytes]], T],
        also: Sequence[str] = (),
    ) -> T:
        """WATCH the job's hash (and the keys `also`), hand its doc and fields to fn, which
        reads and queues commands on the pipeline, then run them in one MULTI/EXEC; all again
        if anyone changed a watched key meanwhile, or the connection was cut. fn's result."""
        key = self._key("job", job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *also)
                    fields: dict[bytes, bytes] = pipe.hgetall(key)
                    if b"doc" not in fields:
                        raise jobs.job_not_found(job_id)
                    out = fn(pipe, Job.model_validate_json(fields[b"doc"]), fields)
                    if pipe.explicit_transaction:  # fn may have nothing to write
                        pipe.execute()
                    return out
                except redis.WatchError:
                    pipe.reset()

    def _put(self, pipe: Pipeline, job: Job) -> Job:
        """Write the job's next snapshot (in the transaction being built) and announce it."""
        if not pipe.explicit_transaction:
            pipe.multi()
        pipe.hset(self._key("job", job.id), "doc", job.model_dump_json())
        pipe.publish(self._channels + "changed", job.id)  # in the transaction: after it lands
        return job

    def _clear_history(self, pipe: Pipeline, job_id: str) -> None:
        pipe.delete(*(self._key("hist", job_id, c) for c in COLUMNS))

    def _beat_key(self, job_id: str, attempt: int) -> str:
        return self._key("beat", job_id, str(attempt))

    @_available
    def claim(self, job_id: str, worker: str, token: str) -> Job | None:
        """Start the next attempt of a queued job for this worker: the job (its `attempts` is
        the attempt's fencing number), or None if there is nothing to run: ended, cancelled,
        evicted, or running already. A message of a running job is a duplicate (the job
        library delivers again after an outage, or to a worker it thought dead), never a death:
        the owner goes on, and if it is really dead the reconciler queues the job again. The
        token makes a claim sent twice (a cut connection) find itself."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status.ended:
                return None
            if job.status is JobStatus.running:
                if fields.get(b"claim") == token.encode():
                    return job
                log.info("job %s: a duplicate delivery of a running job; dropped", job_id)
                return None
            pipe.multi()
            if b"cancel" in fields:
                self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
                return None
            self._clear_history(pipe, job_id)
            job = self._put(pipe, jobs.started(job, jobs.now()))
            attempt = job.attempts
            key = self._key("job", job_id)
            pipe.hset(key, mapping={"worker": worker, "claim": token, "attempt": attempt})
            self._move(pipe, job_id, "queued", "running")
            pipe.set(self._beat_key(job_id, attempt), 0, px=BEAT_TTL_MS)
            pipe.set(self._key("latest"), job_id)
            return job

        try:
            job = self._change(job_id, change)
        except JobNotFound:
            return None
        if job is None:
            self._evict()
        return job

    def _move(self, pipe: Pipeline, job_id: str, source: str, target: str) -> None:
        pipe.zrem(self._key(source), job_id)
        pipe.zadd(self._key(target), {job_id: time.time()})

    @_available
    def beat(self, job_id: str, attempt: int) -> None:
        """The owner of this attempt is alive (a counter, not a time: no clock is compared)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(self._beat_key(job_id, attempt))
        pipe.pexpire(self._beat_key(job_id, attempt), BEAT_TTL_MS)
        pipe.execute()

    @_available
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.hexists(self._key("job", job_id), "cancel"))

    @_available
    def start_job(self, job_id: str) -> Job | None:
        """Mark a queued job running (attempt 1), as the Store protocol's start."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status is not JobStatus.queued:
                return None
            pipe.multi()
            self._clear_history(pipe, job_id)
            pipe.set(self._key("latest"), job_id)
            self._move(pipe, job_id, "queued", "running")
            return self._put(pipe, jobs.started(job, jobs.now()))

        try:
            return self._change(job_id, change)
        except JobNotFound:
            return None

    @_available
    def retry_job(self, job_id: str) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            job = jobs.retried(job)
            pipe.multi()
            self._clear_history(pipe, job_id)
            return self._put(pipe, job)

        return self._change(job_id, change)

    @_available
    def append_history(
        self,
        job_id: str,
        w: Sequence[float],
        b: Sequence[float] | None,
        loss: Sequence[float],
        val_loss: Sequence[float] | None = None,
        attempt: int | None = None,
        at: int | None = None,
    ) -> None:
        """Record the next epochs; with `at` (the epoch they start at), epochs that landed
        already (a write sent twice, or a write whose answer was lost and which the worker
        sends again with more epochs) land once."""
        data = {"w": _raw(w), "loss": _raw(loss)}
        if b is not None:
            data["b"] = _raw(b)
        if val_loss is not None:
            data["val_loss"] = _raw(val_loss)

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            jobs.check_owner(job, attempt)
            landed = 0 if at is None else job.progress.epoch - at
            if not 0 <= landed <= len(w):
                raise Fenced(f"job {job_id} is at epoch {job.progress.epoch}, not {at}")
            if landed == len(w):
                return
            pipe.multi()
            for name in _columns(job):
                if name in data:
                    pipe.append(self._key("hist", job_id, name), data[name][landed * 8 :])
            self._put(pipe, jobs.progressed(job, job.progress.epoch + len(w) - landed))

        self._change(job_id, change)

    @_available
    def requeue_job(self, job_id: str, attempt: int) -> None:
        """Give a running job back to the queue with a new message (its worker is stopping): a
        worker claims it again as its next attempt. Not a death."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> None:
            jobs.check_owner(job, attempt)
            pipe.multi()
            self._requeue(pipe, job)

        self._change(job_id, change)

    def _requeue(self, pipe: Pipeline, job: Job) -> Job:
        job = self._put(pipe, jobs.requeued(job))
        pipe.hdel(self._key("job", job.id), "worker", "claim", "attempt")
        pipe.delete(self._beat_key(job.id, job.attempts))
        self._move(pipe, job.id, "running", "queued")
        self._enqueue(pipe, job.id)
        return job

    @_available
    def succeed_job(self, job_id: str, report: FitReport, attempt: int | None = None) -> Job:
        """End the job and keep its model as the next version, served as the job's `publish`
        says, in one transaction that also watches the version counter (versions are numbered
        in order), the served model (what "if_better" compared against is still served) and the
        kept versions, the oldest of which it evicts: nobody sees more than keep_versions."""
        job_key, served_key = self._key("job", job_id), self._key("served")
        counter_key, versions_key = self._key("version"), self._key("versions")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job_key, counter_key, served_key, versions_key)
                    doc = pipe.hget(job_key, "doc")
                    if doc is None:
                        raise jobs.job_not_found(job_id)
                    job = Job.model_validate_json(doc)
                    if jobs.replayed(job, JobStatus.succeeded, attempt):
                        return job
                    jobs.check_owner(job, attempt)
                    last = int(pipe.get(counter_key) or 0)
                    served_doc = pipe.get(served_key)
                    current = None if served_doc is None else Model.model_validate_json(served_doc)
                    ended = jobs.now()
                    model = jobs.model_of(job, last + 1, report, ended)
                    serve, why_not = jobs.publication(job, report, current)
                    result = jobs.result_of(model, report, serve, why_not)
                    model_doc = model.model_dump_json()
                    kept = [int(v) for v in pipe.zrange(versions_key, 0, -1)] + [model.version]
                    served = model.version if serve else current.version if current else None
                    old = jobs.evicted_versions(kept, served, self._retention()[1])
                    pipe.multi()
                    job = self._finish(pipe, jobs.succeeded(job, result, ended))
                    pipe.set(counter_key, model.version)
                    pipe.hset(self._key("models"), str(model.version), model_doc)
                    pipe.zadd(versions_key, {str(model.version): model.version})
                    if old:
                        pipe.hdel(self._key("models"), *map(str, old))
                        pipe.zrem(versions_key, *map(str, old))
                    if serve:
                        pipe.set(served_key, model_doc)
                        pipe.publish(self._channels + "served", str(model.version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        if serve:
            self._adopt(model_doc.encode())
        self._evict()
        return job

    # -- model versions --------------------------------------------------------------------

    @_available
    def versions(self, limit: int) -> list[Model]:
        kept = self.redis.zrevrange(self._key("versions"), 0, limit - 1)
        if not kept:
            return []
        docs = self.redis.hmget(self._key("models"), kept)
        return [Model.model_validate_json(d) for d in docs if d is not None]

    @_available
    def version(self, version: int) -> Model:
        doc = self.redis.hget(self._key("models"), str(version))
        if doc is None:
            raise jobs.version_not_found(version)
        return Model.model_validate_json(doc)

    @_available
    def serve(self, version: int) -> Model:
        """Serve a kept version: one transaction that watches the kept versions, so that one
        evicted meanwhile is VersionNotFound, never served."""
        models_key, served_key = self._key("models"), self._key("served")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(models_key)
                    doc = pipe.hget(models_key, str(version))
                    if doc is None:
                        raise jobs.version_not_found(version)
                    pipe.multi()
                    pipe.set(served_key, doc)
                    pipe.publish(self._channels + "served", str(version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    pipe.reset()
        self._adopt(doc)
        return Model.model_validate_json(doc)

    @_available
    def end_job(
        self,
        job_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> Job:
        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            if jobs.replayed(job, status, attempt):
                return job
            jobs.check_owner(job, attempt)
            pipe.multi()
            return self._finish(pipe, jobs.ended(job, status, error, jobs.now()))

        job = self._change(job_id, change)
        self._evict()
        return job

    @_available
    def request_cancel(self, job_id: str, token: str | None = None) -> Job:
        """Cancel a queued job now; ask a running one's worker to stop after its current block
        (or, if that worker is dead, the reconciler ends it). The job as it is after the
        request. The token makes a request sent twice (a cut connection) find itself."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job:
            mine = token is not None and fields.get(b"cancelled_by") == token.encode()
            if job.status.ended and mine:
                return job  # this very request, sent twice
            jobs.check_open(job)
            pipe.multi()
            if token is not None:
                pipe.hset(self._key("job", job_id), "cancelled_by", token)
            if job.status is JobStatus.queued:
                return self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
            pipe.hset(self._key("job", job_id), "cancel", "1")
            return job

        job = self._change(job_id, change)
        self._evict()
        return job

    def _finish(self, pipe: Pipeline, job: Job) -> Job:
        """Write a job that has just ended (jobs.ended or jobs.succeeded): it leaves the open
        jobs, its claim, data and beat go, and every replica hears of its end."""
        job = self._put(pipe, job)
        pipe.hdel(self._key("job", job.id), "worker", "claim", "attempt", "cancel")
        pipe.delete(self._key("data", job.id), self._beat_key(job.id, job.attempts))
        pipe.zrem(self._key("queued"), job.id)
        pipe.zrem(self._key("running"), job.id)
        pipe.zadd(self._key("ended"), {job.id: time.time()})
        pipe.publish(self._channels + "ended", job.model_dump_json())
        return job

    def _evict(self) -> None:
        """Forget the jobs that ended longest ago beyond the service's keep_jobs, never the
        served model's."""
        ended = [raw.decode() for raw in self.redis.zrange(self._key("ended"), 0, -1)]
        keep_jobs = self._retention()[0]
        if len(ended) <= keep_jobs:
            return
        served_doc = self.redis.get(self._key("served"))
        served = None if served_doc is None else Model.model_validate_json(served_doc).job_id
        for job_id in jobs.evicted_jobs(ended, served, keep_jobs):
            idem = self.redis.hget(self._key("job", job_id), "idem")
            pipe = self.redis.pipeline()
            pipe.delete(self._key("job", job_id), self._key("data", job_id))
            self._clear_history(pipe, job_id)
            pipe.zrem(self._key("jobs"), job_id)
            pipe.zrem(self._key("ended"), job_id)
            if idem is not None:
                pipe.delete(self._key("idem", idem.decode()))
            pipe.publish(self._channels + "changed", job_id)
            pipe.execute()

    # -- the reconciler's view and repairs -------------------------------------------------

    def open_jobs(self) -> tuple[dict[str, tuple[int, bytes | None]], dict[str, str]]:
        """What the reconciler watches, read now: each running job's attempt and beat counter,
        and each queued job's message that is no longer on the queue (fetched by a worker that
        has not claimed it, or lost with it). Jobs created without a message (the Store
        protocol's create_job alone) are none of its business."""
        running = [i.decode() for i in self.redis.zrange(self._key("running"), 0, -1)]
        queued = [i.decode() for i in self.redis.zrange(self._key("queued"), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in running:
            pipe.hget(self._key("job", job_id), "attempt")
        for job_id in queued:
            pipe.hget(self._key("job", job_id), "msg")
        replies = pipe.execute()
        attempts = {j: int(a) for j, a in zip(running, replies, strict=False) if a is not None}
        messages = {
            j: m.decode() for j, m in zip(queued, replies[len(running) :], strict=True) if m
        }
        pipe = self.redis.pipeline(transaction=False)
        for job_id, attempt in attempts.items():
            pipe.get(self._beat_key(job_id, attempt))
        for message in messages.values():
            pipe.lpos(self._queue_key(), message)
        replies = pipe.execute()
        beats = {j: (a, b) for (j, a), b in zip(attempts.items(), replies, strict=False)}
        positions = replies[len(attempts) :]
        lost = {j: m for (j, m), at in zip(messages.items(), positions, strict=True) if at is None}
        return beats, lost

    @_available
    def bury(self, job_id: str, attempt: int, beat: bytes | None, max_attempts: int) -> Job | None:
        """The owner of this attempt is dead (its beat stood still for a lease): count the
        death, then end the job (cancelled if asked, failed after max_attempts deaths) or queue
        it again with a new message. Nothing if the attempt beat, ended or moved on meanwhile."""
        beat_key = self._beat_key(job_id, attempt)

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> Job | None:
            if job.status is not JobStatus.running or fields.get(b"attempt") != b"%d" % attempt:
                return None
            if pipe.get(beat_key) != beat:
                return None
            deaths = int(fields.get(b"deaths", b"0")) + 1
            pipe.multi()
            pipe.hset(self._key("job", job_id), "deaths", deaths)
            if b"cancel" in fields:
                return self._finish(pipe, jobs.ended(job, JobStatus.cancelled, None, jobs.now()))
            if deaths >= max_attempts:
                last = f"its beat stood still for SGD_LEASE_SECONDS={self.lease_seconds:g}"
                problem = WorkerCrashed.every_attempt(
                    deaths, max_attempts, job.attempts, last
                ).problem()
                return self._finish(pipe, jobs.ended(job, JobStatus.failed, problem, jobs.now()))
            return self._requeue(pipe, job)

        try:
            job = self._change(job_id, change, also=[beat_key])
        except JobNotFound:
            return None
        if job is not None:
            log.warning(
                "job %s: the worker of attempt %d stopped beating for %gs; %s",
                job_id,
                attempt,
                self.lease_seconds,
                "queued again" if not job.status.ended else f"ended {job.status.value}",
            )
            self._evict()
        return job

    @_available
    def resend(self, job_id: str, message: str) -> bool:
        """Queue a new message for a queued job whose message `message` has been off the queue
        for a lease; False if the job moved on meanwhile."""

        def change(pipe: Pipeline, job: Job, fields: dict[bytes, bytes]) -> bool:
            if job.status is not JobStatus.queued or fields.get(b"msg") != message.encode():
                return False
            if pipe.lpos(self._queue_key(), message) is not None:
                return False
            pipe.multi()
            self._enqueue(pipe, job_id)
            return True

        try:
            sent = self._change(job_id, change, also=[self._queue_key()])
        except JobNotFound:
            return False
        if sent:
            log.warning("job %s: its message left the queue without a claim; sent again", job_id)
        return sent

    # -- histories -------------------------------------------------------------------------

    @_available
    def history(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> History:
        return self.history_page(job_id, since, limit, max_points).model()

    @_available
    def history_page(
        self, job_id: str | None, since: int, limit: int | None, max_points: int
    ) -> HistoryPage:
        if job_id is None:
            latest = self.redis.get(self._key("latest"))
            if latest is None:
                raise jobs.no_history()
            job_id = latest.decode()
        job = self.get_job(job_id)
        if job.started_at is None:
            raise jobs.no_history(job_id)
        names = _columns(job)
        keys = [self._key("hist", job_id, n) for n in names]
        # the shortest column: a chunk being appended is whole in all of them or in none
        total = min(self.redis.strlen(k) for k in keys) // 8
        page = Page.of(total, since, limit, max_points)
        cols = {name: self._read(key, page) for name, key in zip(names, keys, strict=True)}
        return HistoryPage(job, page, cols)

    def _read(self, key: str, page: Page) -> Column:
        """A float64 column's values at the page's epochs: one GETRANGE of the page's range, or,
        for a sparse page, one small GETRANGE per epoch (pipelined)."""
        if page.end <= page.start:
            return Column(())
        if page.stride < PICK_READ_STRIDE:
            raw = self.redis.getrange(key, page.start * 8, page.end * 8 - 1)
            values = memoryview(raw).cast("d")
            tail = floats([values[i - page.start] for i in page.tail])
            return Column((values[:: page.stride], tail))  # views, nothing copied
        pipe = self.redis.pipeline(transaction=False)
        for i in page.epochs:
            pipe.getrange(key, i * 8, i * 8 + 7)
        return Column((memoryview(b"".join(pipe.execute())).cast("d"),))


COLUMNS = ("w", "loss", "b", "val_loss")


def _columns(job: Job) -> list[str]:
    """The history columns a job records: w and loss, b with an intercept, val_loss with a
    validation split."""
    names = ["w", "loss"]
    if job.params.fit_intercept:
        names.append("b")
    if job.params.validation_fraction:
        names.append("val_loss")
    return names


def _raw(values: Sequence[float]) -> bytes:
    if isinstance(values, memoryview):
        return values.tobytes()

    return array("d", values).tobytes()


class Reconciler:
    """Repairs what no single process can see go wrong, from any replica or worker, with no
    leader: every process runs one, and each repair is a transaction that checks its cause
    again, so two reconcilers never repair one thing twice.

    - An owner is dead when the beat counter of its attempt stood still for a whole lease of
      this reconciler's watching (its own monotonic clock; no two hosts' clocks are compared).
      Watching counts only while unbroken: a pass that fails or takes long (Redis down or hung,
      this process paused) starts the watch again, so an outage never makes a live owner look
      dead. Its job is queued again (or ends: cancelled, or failed after SGD_JOB_ATTEMPTS
      deaths).
    - A queued job's message that has been off the queue for a lease (fetched by a worker that
      died or lost Redis before it claimed the job) is sent again.

    Both happen within lease + 2 x interval of their cause; a message sent twice is harmless
    (a claim drops a running job's duplicate).
    """

    def __init__(self, store: RedisStore, max_attempts: int) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.lease = store.lease_seconds
        self.interval = min(1.0, self.lease / 4)
        # A pass longer than this, or this long after the last one, breaks the watch.
        self._max_gap = 2 * self.interval + 0.25
        self._seen: dict[tuple[str, ...], tuple[bytes | None, float]] = {}
        self._last_end: float | None = None

    def run(self, stop: threading.Event) -> None:
        """Pass every interval until stop is set; no exception ends the loop."""
        while not stop.wait(self.interval):
            try:
                self.reconcile()
            except Exception:
                if stop.is_set():  # the store closed under this pass
                    return
                log.exception("reconciling failed; trying again")

    def reconcile(self) -> None:
        """One pass: read, then repair what has stood still for a lease of unbroken watching."""
        start = time.monotonic()
        try:
            beats, lost = self.store.open_jobs()
        except (redis.RedisError, ServiceError):
            self._seen.clear()
            self._last_end = None
            return
        end = time.monotonic()
        unbroken = (
            self._last_end is not None
            and start - self._last_end <= self._max_gap
            and end - start <= self._max_gap
        )
        self._last_end = end
        now_seen: dict[tuple[str, ...], bytes | None] = {}
        for job_id, (attempt, beat) in beats.items():
            now_seen[("run", job_id, str(attempt))] = beat
        for job_id, message in lost.items():
            now_seen[("msg", job_id, message)] = None
        if not unbroken:
            self._seen = {k: (v, end) for k, v in now_seen.items()}
            return
        seen: dict[tuple[str, ...], tuple[bytes | None, float]] = {}
        for key, value in now_seen.items():
            before = self._seen.get(key)
            if before is None or before[0] != value:
                seen[key] = (value, end)
                continue
            seen[key] = before
            if start - before[1] < self.lease:
                continue
            with contextlib.suppress(StoreUnavailable):
                if key[0] == "run":
                    self.store.bury(key[1], int(key[2]), value, self.max_attempts)
                else:
                    self.store.resend(key[1], key[2])
            seen.pop(key)
        self._seen = seen
